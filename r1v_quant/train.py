"""Training a small Skywork-R1V from scratch on a CPU, so that accuracy losses mean something.

A random checkpoint answers at chance before and after quantisation, which hides any harm
4-bit weights do. This trains the exact R1V layout (InternViT encoder, ``mlp1``, Qwen2
LLM, same config schema and tensor names, the small R1 tokenizer) on the built-in picture
questions a few-million-parameter model can learn in half an hour of two CPU cores, plus
short text questions, always answering in the R1 form: reasoning, ``</think>``, ``\\boxed{}``.

What such a model learns from a random start are big coloured shapes and small counts, not
the printed labels of the chart and table families, so training draws only ``shape_name``,
``shape_sides`` and ``count_red`` from the built-in "calib" stream; held-out accuracy is
measured on the same families of the separate "eval" stream.

The recipe, shaped by the budget:

1. The vision encoder keeps its random initialisation (rounded to bf16, as saved). Random
   patch projections already separate colours and edges; training the encoder would cost
   half again per picture. Each training picture is rendered and encoded once, and its
   vision tokens are kept for every later pass.
2. Alignment: ``mlp1`` is trained first through a throwaway attention-pooling classifier
   that names each picture's shape or count. Learning those visual features through the
   language model alone takes several times more pictures than the budget holds.
3. Instruction training: ``mlp1`` and the LLM learn the R1 replies (loss on the reply
   tokens only) to those pictures and to fresh text questions, with AdamW and a cosine
   schedule.

Everything is a function of the settings: a fixed seed, fixed step counts, data made from
item indices, deterministic kernels and a fixed thread count, so a rerun writes identical
weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.calib.builtin import reference_response
from r1v_quant.calib.sample import Sample
from r1v_quant.calib.skills import CHANCE, IMAGE_FAMILIES, SHAPES, TEXT_FAMILIES, image_samples, text_samples
from r1v_quant.checkpoint import ShardWriter
from r1v_quant.config import R1VConfig, parse_config
from r1v_quant.errors import UserError
from r1v_quant.layout import checkpoint_shapes
from r1v_quant.model.r1v import R1VModel
from r1v_quant.prompt import IMG_CONTEXT, THINK_START, merge_image_embeddings
from r1v_quant.tiny import TinySizes, tiny_config, write_side_files

# One 448 tile per picture (256 visual tokens): the built-in pictures are plain enough to
# survive the squeeze, and every extra tile would cost a full vision pass.
MINI_SIZES = TinySizes(
    vision_width=128, vision_layers=2, vision_heads=2, vision_intermediate=512,
    llm_width=256, llm_layers=4, heads=4, kv_heads=2, intermediate=768,
    max_dynamic_patch=1,
)
TOKENIZER_SEED = 0
# What the alignment classifier names: the shape in a figure, or the number of red circles.
ALIGN_CLASSES = (*SHAPES, "1", "2", "3", "4", "5", "6")

# Progress: (phase, done, total, loss or None, seconds since the start); phases are
# "pictures", "align" and "train".
ProgressFn = Callable[[str, int, int, "float | None", float], None]


@dataclass(frozen=True)
class TrainSettings:
    pictures: int = 6000        # distinct training pictures
    align_epochs: int = 2
    align_lr: float = 1e-3
    steps: int = 2000           # instruction-training steps
    image_batch: int = 8
    text_batch: int = 4
    lr: float = 2e-3
    warmup_steps: int = 60
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    families: tuple[str, ...] = IMAGE_FAMILIES
    threads: int = 2


# ---------------------------------------------------------------- the model


def mini_config(tok) -> dict:
    """The trained model's config.json: tiny.py's real schema at MINI_SIZES."""
    special = special_ids(tok)
    vocab = -(-len(tok) // 128) * 128
    return tiny_config(vocab, MINI_SIZES, special)


def special_ids(tok) -> dict[str, int]:
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id,
            "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def build_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from r1v_quant.tokenizer_build import build_r1_tokenizer

    return AutoTokenizer.from_pretrained(str(build_r1_tokenizer(folder, seed=TOKENIZER_SEED)))


def init_model(cfg: R1VConfig, seed: int) -> R1VModel:
    """A freshly initialised fp32 model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = R1VModel(cfg)
    std = 0.02
    with torch.no_grad():
        # transformers initialises the LLM; the vision side and mlp1 get the same small
        # normal init (layer scales and norms keep their constructor values).
        for name, p in model.vision_model.named_parameters():
            if name.endswith(("ls1", "ls2")) or "norm" in name:
                continue
            if name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for module in model.mlp1:
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
        # The encoder is never trained, so it starts as the bf16 values it is saved as:
        # the features learned on are the features the checkpoint computes.
        for p in model.vision_model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.vision_model.requires_grad_(False)
    return model


# ---------------------------------------------------------------- data


@dataclass
class Example:
    ids: list[int]                   # prompt, reply and end-of-sequence token
    prompt_len: int
    pixels: torch.Tensor | None      # [tiles, 3, 448, 448]


@dataclass
class Picture:
    """A training picture question, its picture already through the (fixed) vision encoder."""

    ids: list[int]
    prompt_len: int
    tokens: torch.Tensor             # [256, 4 * vision width] bf16, pixel-shuffled, before mlp1
    label: int                       # index into ALIGN_CLASSES


def reply_target(reference: str) -> str:
    """The part of an R1 reply the model writes: the chat prompt already opened ``<think>\\n``."""
    opening = THINK_START + "\n"
    return reference[len(opening):] if reference.startswith(opening) else reference


def encode_example(cfg: R1VConfig, tok, sample: Sample, reply: str) -> Example:
    from r1v_quant.generate import Conversation, encode_conversation

    conv = Conversation()
    conv.add_user(sample.prompt, sample.images)
    prompt, pixels, _ = encode_conversation(cfg, tok, conv)
    prompt_ids = prompt[0].tolist()
    reply_ids = tok(reply_target(reply), add_special_tokens=False).input_ids + [tok.eos_token_id]
    return Example(prompt_ids + reply_ids, len(prompt_ids), pixels)


def align_label(sample: Sample, family: str) -> int:
    """What the picture shows, read off the question's gold answer."""
    answer = str(sample.answer)
    if family == "shape_name":
        shape = sample.options["ABCD".index(answer)]
    elif family == "shape_sides":
        shape = next(name for name, sides in SHAPES.items() if str(sides) == answer)
    else:
        shape = answer
    return ALIGN_CLASSES.index(shape)


def picture_pool(model: R1VModel, cfg: R1VConfig, tok, settings: TrainSettings,
                 on_done: Callable[[int], None] | None = None, chunk: int = 16) -> list[Picture]:
    """The first ``settings.pictures`` training questions of the chosen families, encoded once."""
    stream = image_samples(settings.families, "calib", settings.seed)
    pool: list[Picture] = []
    while len(pool) < settings.pictures:
        batch = [next(stream) for _ in range(min(chunk, settings.pictures - len(pool)))]
        examples = [encode_example(cfg, tok, s, reference_response(s)) for s, _ in batch]
        with torch.no_grad():
            tokens = model.vision_tokens(torch.cat([e.pixels for e in examples])).to(torch.bfloat16)
        for (sample, family), e, t in zip(batch, examples, tokens):
            pool.append(Picture(e.ids, e.prompt_len, t.clone(), align_label(sample, family)))
        if on_done is not None:
            on_done(len(pool))
    return pool


def batched(stream: Iterator, size: int) -> Iterator[list]:
    while True:
        yield [next(stream) for _ in range(size)]


# ---------------------------------------------------------------- the loss


def _collate(rows: Sequence[Example | Picture], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the replies).

    Right padding needs no attention mask: with causal attention no real token sees the
    padding after it, and positions stay those of the unpadded sequence."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        labels[i, r.prompt_len:len(r.ids)] = torch.tensor(r.ids[r.prompt_len:])
    return ids, labels


def reply_loss_sum(model: R1VModel, ids: torch.Tensor, labels: torch.Tensor,
                   tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the reply tokens, and how many there were.
    ``tokens``: the pictures' vision tokens [pictures, 256, 4 * vision width], in row order."""
    lm = model.language_model
    embeds = lm.get_input_embeddings()(ids)
    if tokens is not None:
        feats = model.mlp1(tokens.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        embeds = merge_image_embeddings(embeds, ids, feats, model.img_context_id)
    hidden = lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    # The vocabulary projection only where there is something to predict: most positions
    # are picture and prompt tokens.
    logits = lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


class AlignHead(nn.Module):
    """Attention pooling over a picture's projected tokens, then a small MLP classifier;
    used only to train mlp1 and discarded."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.query = nn.Linear(width, 1)
        self.out = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, classes))

    def forward(self, projected: torch.Tensor) -> torch.Tensor:
        weights = self.query(projected).softmax(dim=1)
        return self.out((weights * projected).sum(dim=1))


# ---------------------------------------------------------------- training


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to final_lr_ratio of the peak."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.final_lr_ratio + (1 - s.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model: R1VModel, s: TrainSettings) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Matrices decay; norms, biases and the embedding tables do not.
        (decay if p.ndim >= 2 and "embed" not in name else plain).append(p)
    return [{"params": decay, "weight_decay": s.weight_decay}, {"params": plain, "weight_decay": 0.0}]


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels on a fixed number of threads, restored afterwards."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def _epochs(count: int, batch: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices, a fresh permutation each pass."""
    while True:
        order = torch.randperm(count, generator=gen).tolist()
        for start in range(0, count - batch + 1, batch):
            yield order[start:start + batch]


def align(model: R1VModel, pool: Sequence[Picture], settings: TrainSettings, gen: torch.Generator,
          progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Stage 1: train mlp1 to make the pictures' shapes and counts readable."""
    head = AlignHead(model.cfg.hidden_size, len(ALIGN_CLASSES))
    params = [*model.mlp1.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.align_lr, weight_decay=0.0)
    steps = settings.align_epochs * (len(pool) // settings.image_batch)
    batches = _epochs(len(pool), settings.image_batch, gen)
    losses = []
    for step in range(steps):
        rows = [pool[i] for i in next(batches)]
        projected = model.mlp1(torch.stack([r.tokens for r in rows]).float())
        loss = F.cross_entropy(head(projected), torch.tensor([r.label for r in rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return losses


@dataclass
class Trained:
    model: R1VModel
    config: dict
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    align_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def train(settings: TrainSettings, tokenizer_dir: Path, progress: ProgressFn | None = None) -> Trained:
    """Train from scratch; ``tokenizer_dir`` receives the tokenizer files."""
    s = settings
    if s.steps < 1 or s.image_batch < 1 or s.text_batch < 0 or s.pictures < s.image_batch or s.align_epochs < 0:
        raise UserError("training needs at least one step, one picture per step and a picture pool of one batch.")
    tok = build_tokenizer(Path(tokenizer_dir))
    raw = mini_config(tok)
    cfg = parse_config(raw)
    start, cpu_start = time.perf_counter(), time.process_time()

    def report(phase: str, done: int, total: int, loss: float | None) -> None:
        if progress is not None:
            progress(phase, done, total, loss, time.perf_counter() - start)

    with deterministic(s.threads):
        model = init_model(cfg, s.seed)
        model.img_context_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
        gen = torch.Generator().manual_seed(s.seed)
        pool = picture_pool(model, cfg, tok, s, lambda n: report("pictures", n, s.pictures, None))
        model.train()
        align_losses = align(model, pool, s, gen, lambda i, n, loss: report("align", i, n, loss))
        opt = torch.optim.AdamW(_param_groups(model, s), lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
        params = [p for g in opt.param_groups for p in g["params"]]
        pad = special_ids(tok)["pad"]
        pictures = _epochs(len(pool), s.image_batch, gen)
        texts = batched(text_samples("calib", s.seed), max(s.text_batch, 1))
        losses: list[float] = []
        for step in range(s.steps):
            lr = lr_at(step, s)
            for group in opt.param_groups:
                group["lr"] = lr
            rows = [pool[i] for i in next(pictures)]
            total, count = reply_loss_sum(model, *_collate(rows, pad), torch.stack([r.tokens for r in rows]))
            if s.text_batch:
                words = [encode_example(cfg, tok, q, reply) for q, reply, _ in next(texts)]
                text_total, text_count = reply_loss_sum(model, *_collate(words, pad))
                total, count = total + text_total, count + text_count
            loss = total / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            losses.append(loss.item())
            report("train", step + 1, s.steps, losses[-1])
        del pool
    model.eval().requires_grad_(False)
    return Trained(model, raw, tok, losses, align_losses, time.perf_counter() - start, time.process_time() - cpu_start)


# ---------------------------------------------------------------- saving


def write_checkpoint(trained: Trained, folder: Path, max_shard_bytes: int = 4 * 1024**2) -> None:
    """Write the model into ``folder`` as a bf16 checkpoint in the real layout: config,
    shards and index through the exporter's ShardWriter, tokenizer and side files."""
    from r1v_quant.tokenizer_build import build_r1_tokenizer

    folder = Path(folder)
    cfg = parse_config(trained.config)
    state = trained.model.state_dict()
    names = checkpoint_shapes(cfg)
    if set(names) != set(state):
        odd = sorted(set(state) ^ set(names))
        raise RuntimeError(f"the model's tensors and the checkpoint layout disagree (first: {odd[0]})")
    build_r1_tokenizer(folder, seed=TOKENIZER_SEED)
    (folder / "config.json").write_text(json.dumps(trained.config, indent=2) + "\n")
    writer = ShardWriter(folder, max_shard_bytes)
    for name, shape in names.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{name} has shape {list(tensor.shape)}, the layout says {list(shape)}")
        writer.add(name, tensor.detach().to(torch.bfloat16))
    writer.close()
    write_side_files(folder, special_ids(trained.tokenizer))


def settings_record(settings: TrainSettings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


# ---------------------------------------------------------------- held-out accuracy


def answer_questions(loaded, questions: Sequence[tuple[Sample, str]], max_new_tokens: int = 64,
                     on_done: Callable[[int, int], None] | None = None, threads: int = 1) -> list[dict]:
    """Greedy replies through the project's own generate path, scored like ``r1v-quant eval``.

    One thread by default: decoding a model this small is a long run of tiny kernels, and
    on a busy machine a second thread mostly waits for its partner to be scheduled."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _answer(loaded, questions, max_new_tokens, on_done)
    finally:
        torch.set_num_threads(before)


def _answer(loaded, questions, max_new_tokens, on_done) -> list[dict]:
    from r1v_quant.evals.scoring import is_correct
    from r1v_quant.generate import Conversation, Sampling, reply_to

    sampling = Sampling(greedy=True, max_new_tokens=max_new_tokens)
    results = []
    for i, (sample, family) in enumerate(questions):
        conv = Conversation()
        conv.add_user(sample.prompt, sample.images)
        reply = reply_to(loaded, conv, sampling)
        # The chat template's generation prompt opens the reasoning block itself.
        results.append({"id": sample.id, "family": family, "answer": sample.answer, "reply": reply.text,
                        "correct": is_correct(sample, reply.text, think_opened=True)})
        if on_done is not None:
            on_done(i + 1, len(questions))
    return results


def accuracy_table(results: Sequence[dict]) -> list[dict]:
    """Per family and overall: accuracy with its 95% Wilson interval, and chance, in percent."""
    from r1v_quant.evals.stats import accuracy_interval

    rows = []
    families = list(dict.fromkeys(r["family"] for r in results))
    groups = [(f, [r for r in results if r["family"] == f]) for f in families]
    pictures = [r for r in results if r["family"] not in TEXT_FAMILIES]
    if pictures and len(pictures) < len(results):
        groups.append(("all pictures", pictures))
        groups.append(("all text", [r for r in results if r["family"] in TEXT_FAMILIES]))
    groups.append(("all", list(results)))
    for name, rows_of in groups:
        est = accuracy_interval([r["correct"] for r in rows_of])
        chance = 100.0 * sum(CHANCE[r["family"]] for r in rows_of) / len(rows_of)
        rows.append({"family": name, "n": len(rows_of), "accuracy": round(est.value, 1), "lo": round(est.lo, 1),
                     "hi": round(est.hi, 1), "chance": round(chance, 1)})
    return rows
