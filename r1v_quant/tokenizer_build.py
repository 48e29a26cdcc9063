"""A small tokenizer with the DeepSeek-R1-Distill-Qwen conventions, for test checkpoints.

The real tokenizer has 152k entries and cannot ship with tests; this one keeps what the
code depends on: byte-level BPE with Qwen2's pre-tokenizer (digits split one by one), the
same special tokens in the same relative order after the ordinary vocabulary, BOS added on
encode, `<think>`/`</think>` as added but non-special tokens (they survive
`skip_special_tokens`), the VLM's `<img>`, `</img>`, `<IMG_CONTEXT>`, and the real chat
template. Same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from r1v_quant.prompt import IMG_CONTEXT, IMG_END, IMG_START, THINK_END, THINK_START

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# (token, special) in id order after the BPE vocabulary, mirroring the real layout
# (151643 EOS, 151644 User, 151645 Assistant, 151646 BOS, 151648 <think>, 151649 </think>,
# the VLM's image tokens appended after).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (EOS, True),
    (USER, True),
    (ASSISTANT, True),
    (BOS, True),
    (THINK_START, False),
    (THINK_END, False),
    (IMG_START, True),
    (IMG_END, True),
    (IMG_CONTEXT, True),
)

# Qwen2's split rule: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MODEL_MAX_LENGTH = 16384
CHAT_TEMPLATE_FILE = "r1_chat_template.jinja"

_SUBJECTS = (
    "bar chart", "pie chart", "line graph", "scatter plot", "table", "circle", "triangle", "square",
    "rectangle", "polygon", "hexagon", "cylinder", "cone", "sphere", "cube", "parabola", "function",
    "equation", "matrix", "vector", "probability", "histogram", "diagram", "map", "circuit",
    "molecule", "cell", "population", "experiment", "painting", "building", "bridge", "engine",
    "spring", "pendulum", "lens", "magnet", "battery", "resistor", "market", "price", "budget",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "large", "small", "shaded", "right", "isosceles", "equilateral",
    "acute", "obtuse", "parallel", "perpendicular", "total", "average", "maximum", "minimum", "first",
    "second", "third", "last", "largest", "smallest", "horizontal", "vertical", "inner", "outer",
    "positive", "negative", "constant", "linear", "quadratic", "annual", "monthly", "daily",
)
_QUANTITIES = (
    "area", "perimeter", "radius", "diameter", "angle", "length", "height", "width", "volume", "mass",
    "speed", "velocity", "acceleration", "force", "energy", "current", "voltage", "resistance",
    "frequency", "temperature", "pressure", "density", "value", "percentage", "ratio", "difference",
    "sum", "product", "slope", "intercept", "median", "mode", "mean", "variance", "profit", "cost",
)
_VERBS = (
    "shows", "contains", "represents", "compares", "describes", "measures", "increases", "decreases",
    "doubles", "equals", "exceeds", "crosses", "touches", "divides", "connects", "rotates",
)
_QUESTIONS = (
    "What is the {q} of the {a} {s}?",
    "Which option best describes the {s}?",
    "How many {s}s are shown in the image?",
    "Find the {q} of the {s} in the figure.",
    "According to the {s}, which year has the {a} {q}?",
    "If the {q} {v} by {n}, what is the new {q2}?",
    "The {a} {s} {v} the {s2}. What is the {q}?",
    "Based on the {s}, estimate the {q} to the nearest whole number.",
)
_THOUGHTS = (
    "Okay, so I need to figure out the {q} of the {s}.",
    "Let me look at the {s} carefully.",
    "First, I notice that the {a} {s} {v} the {s2}.",
    "Wait, let me double-check that calculation.",
    "Hmm, that doesn't seem right. Let me try again.",
    "So the {q} should be {n} units.",
    "Alternatively, I could use the formula for the {q}.",
    "That means option {o} is correct.",
    "Therefore, the answer is {o}.",
    "I think I've got it now.",
    "Let me verify: {n} plus {m} equals {nm}, which matches.",
    "But wait, the question asks for the {q2}, not the {q}.",
)
_LATEX = (
    r"\frac{{{n}}}{{{m}}}",
    r"\sqrt{{{n}}}",
    r"{n}^2 + {m}^2",
    r"\pi r^2",
    r"2 \pi r",
    r"\frac{{1}}{{2}} \times {n} \times {m}",
    r"x = \frac{{-b \pm \sqrt{{b^2 - 4ac}}}}{{2a}}",
    r"\sin \theta = \frac{{{n}}}{{{m}}}",
    r"\cos({n}^\circ)",
    r"\log_{{2}} {n}",
    r"\sum_{{i=1}}^{{{n}}} i",
    r"\int_0^{{{n}}} x \, dx",
    r"\angle ABC = {n}^\circ",
)
_EXTRA_WORDS = (
    "the of and to in is that for it as with was on be by this are which from at or an have not "
    "answer question options correct incorrect choose select image figure picture photo shown below "
    "above left right top bottom each every both either neither because since therefore however "
    "step solve compute calculate determine estimate compare explain reason think check verify "
    "number numbers digit digits integer fraction decimal percent degree degrees unit units meter "
    "meters second seconds hour hours year years student students teacher school class group data "
    "chart charts graph graphs axis axes label labels legend scale point points line lines segment "
    "Python code function variable loop list table tables row rows column columns cell cells total "
    "color colour shape shapes side sides corner corners edge edges face faces center middle half "
    "quarter double triple twice once again also only just very more most less least than then"
).split()


def _sample_text(rng: random.Random) -> str:
    """One short document: a question with options, a reasoning trace, a boxed answer."""
    def fill(template: str) -> str:
        n, m = rng.randint(1, 999), rng.randint(1, 99)
        return template.format(
            s=rng.choice(_SUBJECTS), s2=rng.choice(_SUBJECTS), a=rng.choice(_ADJECTIVES),
            q=rng.choice(_QUANTITIES), q2=rng.choice(_QUANTITIES), v=rng.choice(_VERBS),
            n=n, m=m, nm=n + m, o=rng.choice("ABCD"),
        )

    question = fill(rng.choice(_QUESTIONS))
    options = "\n".join(f"{letter}. {fill(rng.choice(_LATEX))}" for letter in "ABCD")
    thoughts = " ".join(fill(rng.choice(_THOUGHTS)) for _ in range(rng.randint(2, 6)))
    words = " ".join(rng.choice(_EXTRA_WORDS) for _ in range(rng.randint(8, 24)))
    answer = rng.choice("ABCD")
    return (
        f"Question: {question}\nOptions:\n{options}\n"
        "Please select the correct answer from the options above. \n"
        f"{thoughts}\n{words.capitalize()}.\n\n"
        f"The {rng.choice(_QUANTITIES)} is ${fill(rng.choice(_LATEX))}$, so the answer is "
        f"\\boxed{{{answer}}}.\n"
    )


def training_corpus(seed: int = 0, documents: int = 1000) -> list[str]:
    """The built-in English and maths corpus, generated from the seed."""
    rng = random.Random(seed)
    corpus = [_sample_text(rng) for _ in range(documents)]
    # Every listed word with common inflections, capitalised and not, so the vocabulary
    # reaches its size on word pieces rather than on noise.
    words = sorted({w for phrase in _SUBJECTS + _ADJECTIVES + _QUANTITIES + _VERBS for w in phrase.split()}
                   | set(_EXTRA_WORDS))
    for word in words:
        forms = [word, word + "s", word + "ed", word + "ing"]
        corpus.append(" ".join(forms + [f.capitalize() for f in forms]))
    return corpus


def chat_template() -> str:
    """The DeepSeek-R1-Distill-Qwen chat template, as the model's tokenizer_config.json ships it."""
    return resources.files("r1v_quant").joinpath("data", CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_conventions(tok: Tokenizer) -> None:
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        added = tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        if added != 1:
            raise ValueError(f"{content} is already in the trained vocabulary.")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])


def train_tokenizer(vocab_size: int = 2048, seed: int = 0) -> Tokenizer:
    """Train the BPE so that, with the added tokens, the vocabulary has exactly vocab_size ids."""
    bpe_size = vocab_size - len(ADDED_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_size < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(ADDED_TOKENS)}, got {vocab_size}.")
    tok = _base_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise ValueError(
            f"the built-in corpus only supports {tok.get_vocab_size() + len(ADDED_TOKENS)} ids; "
            f"vocab_size={vocab_size} is too large."
        )
    _add_conventions(tok)
    return tok


def tokenizer_config(model_max_length: int = MODEL_MAX_LENGTH) -> dict:
    """The tokenizer_config.json that lets AutoTokenizer load the folder offline."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": EOS,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build_r1_tokenizer(
    out_dir: str | Path, vocab_size: int = 2048, seed: int = 0, model_max_length: int = MODEL_MAX_LENGTH
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size, seed)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config(model_max_length))
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS})
    return out
