"""Training a small Skywork-R1V from scratch on a CPU, so that accuracy losses mean something.

A random checkpoint answers at chance before and after quantisation, which hides any harm
4-bit weights do. This trains the exact R1V layout (InternViT encoder, ``mlp1``, Qwen2
LLM, same config schema and tensor names, the small R1 tokenizer) on the built-in
picture questions the model can learn in half an hour of two CPU cores, plus short text
questions, always answering in the R1 form ``<think>`` reasoning ``</think>`` ``\\boxed{}``.

What a 5M-parameter model learns from a random start in a few thousand examples are big
coloured shapes and small counts, not the fine printed labels of the chart and table
families, so training draws only ``shape_name``, ``shape_sides`` and ``count_red`` from
the built-in calibration stream, and measures held-out accuracy on the same families of
the separate "eval" stream.

Everything is a function of the settings: a fixed seed, a fixed step count, data made on
the fly from item indices, deterministic kernels and a fixed thread count, so a rerun
writes identical weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from r1v_quant.calib.builtin import builtin_item, reference_response, sample_id, to_sample
from r1v_quant.calib.mmmu import pose_question
from r1v_quant.calib.sample import Sample
from r1v_quant.checkpoint import ShardWriter
from r1v_quant.config import R1VConfig, parse_config
from r1v_quant.errors import UserError
from r1v_quant.layout import checkpoint_shapes
from r1v_quant.model.projector import tokens_from_patches
from r1v_quant.model.r1v import R1VModel
from r1v_quant.output import staged_dir
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
IMAGE_FAMILIES = ("shape_name", "shape_sides", "count_red")
TEXT_FAMILIES = ("add", "sub", "mul", "largest", "sides_open", "sides_choice")

# Accuracy of guessing uniformly among the answers a family can have.
CHANCE = {
    "shape_name": 1 / 4,        # four options
    "shape_sides": 1 / 4,       # 3, 4, 5 or 6
    "count_red": 1 / 6,         # 1 to 6
    "bar_tallest": 1 / 4, "bar_value": 1 / 39, "rect_area": 1 / 4, "table_lookup": 1 / 20, "table_sum": 1 / 4,
    "add": 1 / 41, "sub": 1 / 31, "mul": 1 / 36, "largest": 1 / 4, "sides_open": 1 / 4, "sides_choice": 1 / 4,
}
SHAPES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}

# Each step's lines: (step, loss, learning rate, seconds since the start).
StepFn = Callable[[int, float, float, float], None]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    image_batch: int = 8
    text_batch: int = 8
    lr: float = 2e-3
    warmup_steps: int = 60
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    families: tuple[str, ...] = IMAGE_FAMILIES
    train_vision: bool = True
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
    for name, p in model.vision_model.named_parameters():
        # transformers initialises the LLM; the vision side gets the same small normal init
        # (layer scales and norms keep their constructor values).
        if name.endswith(("ls1", "ls2")) or "norm" in name:
            continue
        with torch.no_grad():
            if name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
    for module in model.mlp1:
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                module.bias.zero_()
    return model


# ---------------------------------------------------------------- data


@dataclass
class Example:
    ids: list[int]                   # prompt, reply and end-of-sequence token
    prompt_len: int
    pixels: torch.Tensor | None      # [tiles, 3, 448, 448]
    family: str


def reply_target(reference: str) -> str:
    """The part of an R1 reply the model writes: the chat prompt already opened ``<think>\\n``."""
    opening = THINK_START + "\n"
    return reference[len(opening):] if reference.startswith(opening) else reference


def encode_example(cfg: R1VConfig, tok, sample: Sample, reply: str, family: str) -> Example:
    from r1v_quant.generate import Conversation, encode_conversation

    conv = Conversation()
    conv.add_user(sample.prompt, sample.images)
    prompt, pixels, _ = encode_conversation(cfg, tok, conv)
    prompt_ids = prompt[0].tolist()
    reply_ids = tok(reply_target(reply), add_special_tokens=False).input_ids + [tok.eos_token_id]
    return Example(prompt_ids + reply_ids, len(prompt_ids), pixels, family)


def image_samples(families: Sequence[str], split: str, seed: int, start: int = 0) -> Iterator[tuple[Sample, str]]:
    """Built-in questions of the chosen families, in index order; endless."""
    from r1v_quant.calib.builtin import FAMILIES

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown picture family {unknown[0]!r}; choose from {', '.join(FAMILIES)}.")
    index = start
    while True:
        item = builtin_item(split, seed, index)
        if item.family in families:
            yield to_sample(item, sample_id(split, seed, index)), item.family
        index += 1


def _join(values: Sequence[object]) -> str:
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " and " + words[-1]


def text_question(split: str, seed: int, index: int) -> tuple[Sample, str, str]:
    """(question, R1 reply, family) of a short text question; depends only on its arguments."""
    rng = random.Random(f"r1v-quant/mini-text/{split}/{seed}/{index}")
    family = TEXT_FAMILIES[index % len(TEXT_FAMILIES)]
    options: tuple[str, ...] = ()
    if family == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        question, answer, why = f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}."
    elif family == "sub":
        a = rng.randint(0, 30)
        b = rng.randint(0, a)
        question, answer, why = f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}."
    elif family == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, answer, why = f"What is {a} * {b}?", str(a * b), f"{a} * {b} = {a * b}."
    elif family == "largest":
        values = rng.sample(range(1, 60), 4)
        options = tuple(str(v) for v in values)
        top = max(values)
        letter = "ABCD"[values.index(top)]
        question, answer = "Which number is the largest?", letter
        why = f"The numbers are {_join(values)}. The largest is {top}, which is option {letter}."
    elif family == "sides_open":
        shape = rng.choice([s for s in SHAPES if SHAPES[s]])
        question, answer = f"How many sides does a {shape} have?", str(SHAPES[shape])
        why = f"A {shape} has {SHAPES[shape]} sides."
    else:
        shape = rng.choice(sorted(SHAPES))
        others = rng.sample([s for s in sorted(SHAPES) if s != shape], 3)
        names = rng.sample([shape, *others], 4)
        options = tuple(names)
        letter = "ABCD"[names.index(shape)]
        sides = SHAPES[shape]
        if sides:
            question = f"Which shape has {sides} sides?"
            why = f"A {shape} has {sides} sides, so the answer is {shape}, option {letter}."
        else:
            question = "Which shape is round with no corners?"
            why = f"A circle is round with no corners, so the answer is circle, option {letter}."
        answer = letter
    sample = Sample(id=f"mini-text-{split}-{seed}-{index:05d}", prompt=pose_question(question, options),
                    answer=answer, subject="arithmetic" if family in ("add", "sub", "mul", "largest") else "shapes",
                    kind="multiple-choice" if options else "open", options=list(options))
    return sample, f"<think>\n{why}\n</think>\n\n\\boxed{{{answer}}}", family


def text_samples(split: str, seed: int, start: int = 0) -> Iterator[tuple[Sample, str, str]]:
    index = start
    while True:
        yield text_question(split, seed, index)
        index += 1


def batched(stream: Iterator, size: int) -> Iterator[list]:
    while True:
        yield [next(stream) for _ in range(size)]


# ---------------------------------------------------------------- the loss


def _collate(examples: Sequence[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ids, labels (-100 outside replies) and the stacked tiles.

    Right padding needs no attention mask: with causal attention no real token sees the
    padding after it, and positions stay those of the unpadded sequence."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.prompt_len:len(e.ids)] = torch.tensor(e.ids[e.prompt_len:])
    tiles = [e.pixels for e in examples if e.pixels is not None]
    return ids, labels, torch.cat(tiles) if tiles else None


def reply_loss_sum(model: R1VModel, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor | None,
                   train_vision: bool) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the reply tokens, and how many there were."""
    lm = model.language_model
    embeds = lm.get_input_embeddings()(ids)
    if pixels is not None:
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            hidden = model.vision_model(pixels, model.cfg.select_layer)[:, 1:, :]
        tokens = tokens_from_patches(hidden, model.cfg.downsample_ratio, model.cfg.ps_version)
        feats = model.mlp1(tokens).reshape(-1, embeds.shape[-1])
        embeds = merge_image_embeddings(embeds, ids, feats, model.img_context_id)
    hidden = lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    # The vocabulary projection only where there is something to predict: most positions
    # are picture and prompt tokens.
    logits = lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


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
        # Matrices decay; norms, biases, layer scales and the embedding tables do not.
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


@dataclass
class Trained:
    model: R1VModel
    config: dict
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def train(settings: TrainSettings, tokenizer_dir: Path, on_step: StepFn | None = None) -> Trained:
    """Train from scratch; ``tokenizer_dir`` receives the tokenizer files."""
    if settings.steps < 1 or settings.image_batch < 1 or settings.text_batch < 0:
        raise UserError("training needs at least one step and one picture per step.")
    tok = build_tokenizer(Path(tokenizer_dir))
    raw = mini_config(tok)
    cfg = parse_config(raw)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses: list[float] = []
    with deterministic(settings.threads):
        model = init_model(cfg, settings.seed)
        model.img_context_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
        model.vision_model.requires_grad_(settings.train_vision)
        model.train()
        opt = torch.optim.AdamW(_param_groups(model, settings), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)
        pad = special_ids(tok)["pad"]
        pictures = batched(image_samples(settings.families, "calib", settings.seed), settings.image_batch)
        texts = batched(text_samples("calib", settings.seed), max(settings.text_batch, 1))
        params = [p for g in opt.param_groups for p in g["params"]]
        for step in range(settings.steps):
            lr = lr_at(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = [encode_example(cfg, tok, s, reference_response(s), fam) for s, fam in next(pictures)]
            total, count = reply_loss_sum(model, *_collate(batch, pad), settings.train_vision)
            if settings.text_batch:
                words = [encode_example(cfg, tok, s, reply, fam) for s, reply, fam in next(texts)]
                text_total, text_count = reply_loss_sum(model, *_collate(words, pad), settings.train_vision)
                total, count = total + text_total, count + text_count
            loss = total / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1], lr, time.perf_counter() - start)
    model.eval().requires_grad_(False)
    return Trained(model, raw, tok, losses, time.perf_counter() - start, time.process_time() - cpu_start)


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


def save_checkpoint(trained: Trained, out_dir: Path, force: bool = False) -> Path:
    """``write_checkpoint`` into a folder that appears whole or not at all."""
    out = Path(out_dir)
    with staged_dir(out, force=force) as tmp:
        write_checkpoint(trained, tmp)
    return out


def settings_record(settings: TrainSettings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


# ---------------------------------------------------------------- held-out accuracy


def heldout_questions(image_count: int, text_count: int, families: Sequence[str] = IMAGE_FAMILIES,
                      seed: int = 0) -> list[tuple[Sample, str]]:
    """The first ``image_count`` built-in "eval" questions of ``families`` and the first
    ``text_count`` held-out text questions, each with its family."""
    out: list[tuple[Sample, str]] = []
    pictures = image_samples(families, "eval", seed)
    out += [next(pictures) for _ in range(image_count)]
    words = text_samples("eval", seed)
    out += [(s, fam) for s, _, fam in (next(words) for _ in range(text_count))]
    return out


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
    groups.append(("all", list(results)))
    for name, rows_of in groups:
        est = accuracy_interval([r["correct"] for r in rows_of])
        chance = 100.0 * sum(CHANCE[r["family"]] for r in rows_of) / len(rows_of)
        rows.append({"family": name, "n": len(rows_of), "accuracy": round(est.value, 1), "lo": round(est.lo, 1),
                     "hi": round(est.hi, 1), "chance": round(chance, 1)})
    return rows
