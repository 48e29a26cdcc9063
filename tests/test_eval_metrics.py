import math

import pytest
import torch

from r1v_quant.evals.metrics import IGNORE_INDEX, mean_kl, perplexity, token_kl, token_nll, top1_agreement


def _logits(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_of_identical_logits_is_exactly_zero(dtype):
    logits = _logits(2, 5, 11, dtype=dtype)
    kl = token_kl(logits, logits.clone())
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    assert torch.equal(kl, torch.zeros(2, 5))
    assert mean_kl(logits, logits.clone()) == 0.0


def test_kl_matches_a_float64_reference_and_grows_with_noise():
    ref = _logits(4, 9, 32)
    previous = 0.0
    for scale in (0.01, 0.1, 0.5, 2.0):
        cand = ref + scale * _logits(4, 9, 32, seed=1)
        kl = token_kl(ref, cand)
        p = torch.softmax(ref.double(), -1)
        expected = (p * (torch.log_softmax(ref.double(), -1) - torch.log_softmax(cand.double(), -1))).sum(-1)
        torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-6)
        assert (kl > 0).all()
        value = mean_kl(ref, cand)
        assert value > previous
        previous = value


def test_kl_is_shift_invariant_and_handles_2d():
    ref = _logits(6, 10)
    assert token_kl(ref, ref + 7.0).abs().max() < 1e-6  # softmax ignores a constant shift
    assert token_kl(ref, ref).shape == (6,)


def test_kl_with_tokens_the_reference_rules_out_stays_finite():
    ref = _logits(3, 8)
    ref[:, 0] = float("-inf")
    kl = token_kl(ref, _logits(3, 8, seed=2))
    assert torch.isfinite(kl).all() and (kl > 0).all()


def test_mask_zeroes_positions_and_drops_them_from_the_mean():
    ref, cand = _logits(2, 4, 16), _logits(2, 4, 16, seed=5)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    kl = token_kl(ref, cand, mask)
    assert torch.equal(kl[~mask], torch.zeros(5))
    assert mean_kl(ref, cand, mask) == pytest.approx(float(token_kl(ref, cand)[mask].mean()), rel=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    import r1v_quant.evals.metrics as metrics

    ref, cand = _logits(3, 7, 20), _logits(3, 7, 20, seed=9)
    labels = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    whole_kl, whole_nll = token_kl(ref, cand), token_nll(ref, labels)
    monkeypatch.setattr(metrics, "_CHUNK", 4)
    assert torch.equal(token_kl(ref, cand), whole_kl)
    assert torch.equal(token_nll(ref, labels), whole_nll)


def test_top1_agreement_on_a_constructed_case():
    ref = torch.full((4, 5), -1.0)
    cand = torch.full((4, 5), -1.0)
    for t, (a, b) in enumerate([(0, 0), (1, 1), (2, 0), (3, 3)]):
        ref[t, a] = 5.0
        cand[t, b] = 5.0
    assert top1_agreement(ref, cand) == 0.75
    assert top1_agreement(ref.unsqueeze(0), cand.unsqueeze(0)) == 0.75
    assert top1_agreement(ref, cand, torch.tensor([True, True, False, True])) == 1.0


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    vocab = 37
    logits = torch.zeros(2, 6, vocab)
    labels = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    assert perplexity(logits, labels) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_with_known_probabilities_mask_and_ignore_index():
    # Every label gets probability 1/2, so perplexity is 2 whatever is left out.
    logits = torch.full((5, 3), -math.inf)
    logits[:, 0] = 0.0
    logits[:, 1] = 0.0
    labels = torch.tensor([0, 1, 0, IGNORE_INDEX, 1])
    assert perplexity(logits, labels) == pytest.approx(2.0)
    assert perplexity(logits, labels, torch.tensor([True, False, True, True, False])) == pytest.approx(2.0)
    # A label the model gives 1/4 to raises it: exp((2 ln 2 + ln 4) / 3) = 2^(4/3).
    logits2 = torch.zeros(3, 4)
    logits2[:2, 0] = math.log(3.0)  # p = 3/6 = 1/2 on token 0
    labels2 = torch.tensor([0, 0, 2])
    assert perplexity(logits2, labels2) == pytest.approx(2 ** (4 / 3), rel=1e-5)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        token_kl(_logits(2, 3, 4), _logits(2, 3, 5))
    with pytest.raises(ValueError):
        perplexity(_logits(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
