import re

import pytest

from r1v_quant.calib.builtin import FAMILIES, SIZES, builtin_item, builtin_samples, reference_response
from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError

MC_PROMPT = re.compile(
    r"^Question: <image> [^\n]+\nOptions:\nA\. [^\n]+\nB\. [^\n]+\nC\. [^\n]+\nD\. [^\n]+\n"
    r"Please select the correct answer from the options above\. \n$"
)
OPEN_PROMPT = re.compile(r"^Question: <image> [^\n]+\n$")
RESPONSE = re.compile(r"^<think>\n([^\n]+)\n</think>\n\n\\boxed\{([^{}]+)\}$")


def fingerprint(sample: Sample) -> tuple:
    return (sample.id, sample.prompt, sample.answer, tuple(sample.options),
            tuple((im.size, im.mode, im.tobytes()) for im in sample.images))


def test_same_seed_gives_identical_prompts_and_pixels():
    first = builtin_samples(24, seed=3)
    second = builtin_samples(24, seed=3)
    assert [fingerprint(s) for s in first] == [fingerprint(s) for s in second]


def test_other_seed_gives_other_items():
    a = builtin_samples(16, seed=0)
    b = builtin_samples(16, seed=1)
    same = sum(x.images[0].tobytes() == y.images[0].tobytes() for x, y in zip(a, b))
    assert same == 0


def test_a_smaller_set_is_a_prefix_of_a_larger_one():
    assert [fingerprint(s) for s in builtin_samples(9)] == [fingerprint(s) for s in builtin_samples(20)[:9]]


def test_eval_split_is_held_out_from_calib():
    calib = builtin_samples(80, split="calib")
    held_out = builtin_samples(80, split="eval")
    assert not {s.id for s in calib} & {s.id for s in held_out}
    calib_items = {(s.prompt, s.images[0].tobytes()) for s in calib}
    assert not any((s.prompt, s.images[0].tobytes()) in calib_items for s in held_out)


def test_every_family_and_both_kinds_appear_in_a_small_set():
    samples = builtin_samples(len(FAMILIES))
    assert {builtin_item("calib", 0, i).family for i in range(len(FAMILIES))} == set(FAMILIES)
    kinds = [s.kind for s in samples]
    assert kinds.count("multiple-choice") == 4 and kinds.count("open") == 4
    assert {s.subject for s in samples} == {"charts", "geometry", "tables", "counting"}


def test_prompts_follow_the_vendor_mmmu_format():
    for s in builtin_samples(40):
        assert len(s.images) == 1 and s.prompt.count("<image>") == 1
        if s.kind == "multiple-choice":
            assert MC_PROMPT.match(s.prompt), s.prompt
            assert len(s.options) == 4 and len(set(s.options)) == 4
            assert s.answer in "ABCD"
            for letter, option in zip("ABCD", s.options):
                assert f"\n{letter}. {option}\n" in s.prompt
        else:
            assert OPEN_PROMPT.match(s.prompt), s.prompt
            assert s.options == [] and s.answer.isdigit()


def test_image_shapes_vary_to_exercise_tiling():
    samples = builtin_samples(40)
    sizes = {s.images[0].size for s in samples}
    assert sizes <= set(SIZES) and len(sizes) >= 4
    assert all(s.images[0].mode == "RGB" for s in samples)


def test_pictures_are_drawn_not_blank():
    for s in builtin_samples(8):
        low, high = s.images[0].convert("L").getextrema()
        assert low < 100 and high == 255


def test_reference_response_of_the_first_item_is_exact():
    first = builtin_samples(1)[0]
    assert first.answer == "C"
    assert reference_response(first) == (
        "<think>\nThe bars read Kiwis 16, Plums 13, Apples 27 and Pears 10. "
        "Apples is the tallest, which is option C.\n</think>\n\n\\boxed{C}"
    )


def test_reference_responses_box_the_gold_answer_and_reason_with_its_numbers():
    for s in builtin_samples(48, seed=5):
        match = RESPONSE.match(reference_response(s))
        assert match, reference_response(s)
        reasoning, boxed = match.groups()
        assert boxed == s.answer
        family = builtin_item("calib", 5, int(s.id.rsplit("-", 1)[1])).family
        if family == "rect_area":
            a, b, area = map(int, re.search(r"(\d+) \* (\d+) = (\d+)", reasoning).groups())
            assert a * b == area == int(s.options["ABCD".index(s.answer)])
        elif family == "table_sum":
            terms, total = re.search(r"is ([\d + ]+) = (\d+)", reasoning).groups()
            assert sum(map(int, terms.split(" + "))) == int(total) == int(s.options["ABCD".index(s.answer)])
        elif family == "bar_tallest":
            readings = {n: int(v) for n, v in re.findall(r"([A-Z][a-z]+) (\d+)", reasoning)}
            assert max(readings, key=readings.get) == s.options["ABCD".index(s.answer)]
        elif family in ("bar_value", "table_lookup", "count_red", "shape_sides"):
            assert re.search(rf"\b{s.answer}\b", reasoning)


def test_reference_response_refuses_foreign_or_altered_samples():
    with pytest.raises(UserError, match="not from the built-in set"):
        reference_response(Sample(id="validation_Art_1", prompt="Question: x\n"))
    tampered = builtin_samples(1)[0]
    tampered.answer = "D"
    with pytest.raises(UserError, match="has answer"):
        reference_response(tampered)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="split"):
        builtin_samples(2, split="test")
    with pytest.raises(UserError, match="negative"):
        builtin_samples(-1)
    assert builtin_samples(0) == []
