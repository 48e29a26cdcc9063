"""Calibration encoding: image stubs are skipped and counted, and the composition says what the tokens are."""

from r1v_quant.calib.builtin import builtin_samples
from r1v_quant.calib.encode import composition, encode_samples
from r1v_quant.calib.sample import Sample
from r1v_quant.model.config import load_config
from r1v_quant.model.prompt import IMG_START
from r1v_quant.model.r1v import load_tokenizer


def test_a_sample_whose_image_does_not_fit_is_skipped_not_kept_as_a_stub(tiny_dir):
    cfg, tok = load_config(tiny_dir), load_tokenizer(tiny_dir)
    image_sample = builtin_samples(1, seed=0, split="calib")[0]
    assert image_sample.images
    text = Sample(id="t", prompt="Scales and groups of channels, " * 6, kind="text")
    full, skipped = encode_samples([image_sample, text], cfg, tok, seq_len=4096, max_tokens=100_000)
    assert skipped == 0 and len(full) == 2
    block = full[0].ids.index(tok.convert_tokens_to_ids(IMG_START))
    # A sequence length that ends inside the image block: the sample would be its few tokens before the image.
    short = block + 3
    kept, skipped = encode_samples([image_sample, text], cfg, tok, seq_len=short, max_tokens=100_000)
    assert skipped == 1 and [e.sample_id for e in kept] == ["t"]
    info = composition(kept, tok, skipped)
    assert info["samples"] == "1 (0 with images, 1 text only)" and info["image tiles"] == "0"
    assert info["image stubs skipped"].startswith("1 ")
    assert info["tokens"] == f"{len(kept[0].ids)} (0.0% image tokens)"
