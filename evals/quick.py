"""The short closeness checks: the one `awq` runs on its own export before writing the model
card, and KL on held-out prompts (benchmarks and tests compare calibration choices with it).

A handful of held-out built-in questions (the "eval" split, never used for calibration):
the source answers them greedily, then the export is teacher-forced on the source's own
prompt + reply and compared token by token.  Nothing is cached, and the two models are
loaded one after the other, so the check never holds both at once.

`awq` streams one layer at a time and fits where the whole source model does not; this
check needs the whole source on the device.  When it cannot fit, the check is skipped with
a note in the model card instead of failing a quantisation that has already succeeded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1v_quant.evals.run import EvalSettings, evaluate

# Room beyond the weights for activations, the KV cache and the allocator's slack.
_HEADROOM_BYTES = 2 * 1024**3


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _gpu_shortfall(src_dir, device: str | None) -> str | None:
    """Why the source cannot be loaded on the GPU, or None when it fits (or runs on the CPU)."""
    from r1v_quant.model.r1v import pick_device

    dev = pick_device(device)
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    need = _weight_bytes(src_dir) + _HEADROOM_BYTES
    if need <= free:
        return None
    return (f"skipped: the source needs about {need / 1e9:.0f} GB on {dev}, which has {free / 1e9:.0f} GB free; "
            "run r1v-quant eval where the source fits")


def quick_kl(src_dir, export_dir, device: str | None = None, n: int = 8, max_new_tokens: int = 48) -> dict:
    """Human-readable entries for the model card: KL(source || export) and top-1 agreement
    on ``n`` held-out built-in questions.  (Answers are not compared: a few dozen tokens
    rarely reach the end of an R1 model's reasoning.)"""
    shortfall = _gpu_shortfall(src_dir, device)
    if shortfall:
        return {"KL check": shortfall}
    settings = EvalSettings(suite="builtin", limit=n, max_new_tokens=max_new_tokens, device=device,
                            use_cache=False, batch_size=min(n, 4), kl_positions=max_new_tokens)
    try:
        run = evaluate(str(src_dir), str(export_dir), settings)
    except torch.cuda.OutOfMemoryError:
        return {"KL check": f"skipped: the device ran out of memory (device {device or 'default'})"}
    c = run.results.comparison(run.results.candidate)
    positions = sum(item.close.positions for item in run.items[run.results.candidate])
    return {
        "KL(source ‖ export), nats per token": f"{c.mean_kl:.4f}" if c.mean_kl is not None else "n/a",
        "top-1 token agreement": f"{c.top1_agreement:.1f}%" if c.top1_agreement is not None else "n/a",
        "KL measured on": kl_definition(settings, f"{n} built-in eval questions, {positions} positions in all"),
    }


def kl_definition(settings: EvalSettings, where: str) -> str:
    """The one wording of what a KL figure is, for the model card and `eval`'s reports alike: the
    definition is shared, so two figures differ only by the questions and positions named here."""
    return (f"{where}; {settings.describe()['kl']}, greedy source replies of up to {settings.max_new_tokens} tokens "
            f"(the definition of `r1v-quant eval`'s KL, which by default measures the first {EvalSettings.kl_positions} "
            "reply tokens of each question of its suite)")


def heldout_prompts(loaded, n: int) -> tuple[list, list]:
    """The first ``n`` built-in "eval" questions as model inputs ``(ids, pixels)``: with their
    pictures, and as text only (the picture placeholder removed)."""
    from r1v_quant.calib.builtin import builtin_samples
    from r1v_quant.model.generate import encode_prompt
    from r1v_quant.model.prompt import IMAGE_PLACEHOLDER

    with_images, text_only = [], []
    for s in builtin_samples(n, seed=0, split="eval"):
        ids, pixels, _ = encode_prompt(loaded.config, loaded.tokenizer, s.prompt, s.images)
        with_images.append((ids, pixels.to(loaded.dtype)))
        text = s.prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        text_only.append((encode_prompt(loaded.config, loaded.tokenizer, text)[0], None))
    return with_images, text_only


@torch.no_grad()
def prompt_kl(ref_model, cand_model, prompts) -> float:
    """Mean KL(reference || candidate) per prompt position, over the full vocabulary."""
    from r1v_quant.evals.metrics import token_kl

    total, count = 0.0, 0
    for ids, pixels in prompts:
        total += float(token_kl(ref_model(ids, pixels).logits, cand_model(ids, pixels).logits).double().sum())
        count += ids.numel()
    return total / count
