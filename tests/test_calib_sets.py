import json
import time
from collections import Counter

import pytest

from helpers.mmmu_fixture import write_mmmu_fixture
from r1v_quant.calib import hub
from r1v_quant.calib.builtin import builtin_samples
from r1v_quant.calib.mmmu import load_mmmu
from r1v_quant.calib.sets import load_calibration, split_counts
from r1v_quant.calib.text import load_text, split_paragraphs
from r1v_quant.errors import UserError

SUBJECTS = ("Art", "Biology", "Chemistry")


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmmu")
    write_mmmu_fixture(out, subjects=SUBJECTS, per_subject=4)
    return out


@pytest.fixture
def notes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Paragraph {k} about quantisation." for k in range(10)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "n, weights, expected",
    [
        (10, [0.7, 0.3], [7, 3]),
        (10, [1, 1, 1], [4, 3, 3]),
        (5, [1, 1], [3, 2]),
        (7, [0.5, 0.3, 0.2], [4, 2, 1]),
        (128, [0.7, 0.3], [90, 38]),
        (3, [1, 0, 1], [2, 0, 1]),
        (1, [1, 1], [1, 0]),
    ],
)
def test_largest_remainder_counts(n, weights, expected):
    assert split_counts(n, weights) == expected
    assert sum(expected) == n


# ---------------------------------------------------------------- single sets


def test_builtin_spec_is_the_calib_split():
    got = load_calibration("builtin", n=6, seed=2)
    assert [s.id for s in got] == [s.id for s in builtin_samples(6, seed=2)]
    assert all(s.id.startswith("builtin-calib-2-") for s in got)


def test_mmmu_sample_reads_calib_path(mmmu_dir):
    got = load_calibration("mmmu-sample", n=7, seed=1, calib_path=mmmu_dir)
    assert [s.id for s in got] == [s.id for s in load_mmmu(mmmu_dir, n=7, seed=1)]
    assert sorted(Counter(s.subject for s in got).values()) == [2, 2, 3]


def test_a_folder_or_parquet_file_is_an_mmmu_set(mmmu_dir):
    assert len(load_calibration(str(mmmu_dir), n=5)) == 5
    single = load_calibration(str(mmmu_dir / "Art" / "validation-00000-of-00001.parquet"), n=50)
    assert [s.id for s in single] == [f"validation_Art_{k}" for k in range(1, 5)]


def test_text_files(tmp_path, notes):
    got = load_calibration(f"text:{notes}", n=4, seed=0)
    assert len(got) == 4 and all(s.kind == "text" and s.images == [] for s in got)
    assert [s.prompt for s in got] == [s.prompt for s in load_text(notes, 4, 0)]
    numbers = [int(s.prompt.split()[1]) for s in got]
    assert numbers == sorted(numbers)  # the file's order survives the choice
    assert len(load_text(notes, 100, 0)) == 10

    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert [s.prompt for s in load_calibration(f"text:{lines}", n=5)] == ["one", "two"]


def test_paragraph_split():
    assert split_paragraphs("a\nb\n\n  \n\nc\n\n\n") == ["a\nb", "c"]


def test_bad_text_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(UserError, match="line 2 has no string field 'text'"):
        load_calibration(f"text:{bad}")
    bad.write_text("not json\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        load_calibration(f"text:{bad}")
    with pytest.raises(UserError, match="does not exist"):
        load_calibration(f"text:{tmp_path / 'missing.txt'}")
    other = tmp_path / "notes.md"
    other.write_text("hi")
    with pytest.raises(UserError, match="neither a .txt nor a .jsonl"):
        load_calibration(f"text:{other}")


def test_hf_text_from_the_cache(monkeypatch):
    import datasets

    seen = []

    def load_dataset(path, name=None, split=None, **kwargs):
        seen.append((path, name, split, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"body": ["alpha", "", "beta", "gamma"], "text": ["x"] * 4})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = load_calibration("hf:someone/corpus:body", n=10)
    assert [s.prompt for s in got] == ["alpha", "beta", "gamma"]
    assert seen == [("someone/corpus", None, "train", True)]
    with pytest.raises(UserError, match="no column 'missing'; it has body, text"):
        load_calibration("hf:someone/corpus:missing")


# ---------------------------------------------------------------- mixtures


def test_mixture_counts_follow_the_weights(mmmu_dir, notes):
    got = load_calibration("mmmu-sample+text:" + str(notes), n=10, calib_path=mmmu_dir, mix=[0.7, 0.3])
    assert [s.kind == "text" for s in got] == [False] * 7 + [True] * 3


def test_mixture_defaults_to_equal_weights(notes):
    got = load_calibration(f"builtin+text:{notes}", n=5)
    assert Counter(s.kind == "text" for s in got) == {False: 3, True: 2}


def test_mixture_is_deterministic(mmmu_dir, notes):
    def ids():
        return [s.id for s in load_calibration(f"{mmmu_dir}+builtin+text:{notes}", n=11, seed=4, mix=[2, 1, 1])]

    assert ids() == ids()
    assert Counter(i.split("_")[0].split("-")[0].split(":")[0] for i in ids()) == {
        "validation": 5, "builtin": 3, "text": 3  # 5.5, 2.75, 2.75: the larger remainders win
    }


def test_a_zero_weight_part_is_not_loaded_but_still_checked(notes, offline):
    got = load_calibration(f"builtin+mmmu-sample+text:{notes}", n=4, mix=[1, 0, 1])
    assert len(got) == 4
    with pytest.raises(UserError, match="unknown calibration set 'nonsense'"):
        load_calibration("builtin+nonsense", n=4, mix=[1, 0])


# ---------------------------------------------------------------- errors


def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(UserError) as error:
        load_calibration("imagenet")
    message = str(error.value)
    for form in ("builtin", "mmmu-sample", "text:PATH", "hf:NAME[:column]", "parquet", "+"):
        assert form in message


def test_bad_mix_and_counts():
    with pytest.raises(UserError, match="--mix has 3 weight"):
        load_calibration("builtin+builtin", mix=[1, 1, 1])
    with pytest.raises(UserError, match="non-negative"):
        load_calibration("builtin+builtin", mix=[1, -1])
    with pytest.raises(UserError, match="non-negative"):
        load_calibration("builtin+builtin", mix=[0, 0])
    with pytest.raises(UserError, match="must be positive"):
        load_calibration("builtin", n=0)
    with pytest.raises(UserError, match="empty part"):
        load_calibration("builtin+")
    with pytest.raises(UserError, match="no calibration set was named"):
        load_calibration("  ")


def test_an_empty_result_is_a_user_error(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(UserError, match=r"calibration set 'text:.*blank\.txt' yielded no samples"):
        load_calibration(f"text:{blank}")


def test_offline_without_mmmu_data_says_how_to_provide_it(offline):
    start = time.monotonic()
    with pytest.raises(UserError, match="--calib-path"):
        load_calibration("mmmu-sample", n=8)
    assert time.monotonic() - start < 10


def test_offline_hf_text_suggests_a_local_file(offline):
    with pytest.raises(UserError, match="not in the local cache.*text:PATH"):
        load_calibration("hf:someone/corpus", n=8)
