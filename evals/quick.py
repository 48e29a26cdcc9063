"""The short closeness check `awq` runs on its own export before writing the model card.

A handful of held-out built-in questions (the "eval" split, never used for calibration):
the source answers them greedily, then the export is teacher-forced on the source's own
prompt + reply and compared token by token.  Nothing is cached, and the two models are
loaded one after the other, so the check never holds both at once.
"""

from __future__ import annotations

from r1v_quant.evals.run import EvalSettings, evaluate


def quick_kl(src_dir, export_dir, device: str | None = None, n: int = 8, max_new_tokens: int = 48) -> dict:
    """Human-readable entries for the model card: KL(source || export), top-1 and answer
    agreement on ``n`` held-out built-in questions."""
    settings = EvalSettings(suite="builtin", limit=n, max_new_tokens=max_new_tokens, device=device,
                            use_cache=False, batch_size=min(n, 4), kl_positions=max_new_tokens)
    run = evaluate(str(src_dir), str(export_dir), settings)
    c = run.results.comparison(run.results.candidate)
    positions = sum(item.close.positions for item in run.items[run.results.candidate])
    return {
        "KL(source || export), nats per token": f"{c.mean_kl:.4f}" if c.mean_kl is not None else "n/a",
        "top-1 token agreement": f"{c.top1_agreement:.1f}%" if c.top1_agreement is not None else "n/a",
        "same final answer": f"{c.answer_agreement:.0f}%" if c.answer_agreement is not None else "n/a",
        "KL measured on": (f"{n} built-in eval questions, {positions} positions of the source's greedy replies "
                           f"(up to {max_new_tokens} tokens each, top-{settings.top_k} log-probs)"),
    }
