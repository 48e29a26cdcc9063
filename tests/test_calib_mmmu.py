import io
import shutil
import time
from collections import Counter

import pytest
from PIL import Image

from helpers.mmmu_fixture import fixture_row, write_mmmu_fixture
from r1v_quant.calib import hub
from r1v_quant.calib.mmmu import (
    MMMU_SUBJECTS,
    choose_rows,
    format_mmmu_question,
    load_mmmu,
    parse_options,
    pose_question,
    stratified_counts,
)
from r1v_quant.errors import UserError

SUBJECTS = ("Accounting", "Art_Theory", "Math", "Physics", "Sociology")


def png(colour, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def colours(images):
    return [im.getpixel((0, 0)) for im in images]


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

KNOWN_ROW = {
    "id": "validation_Physics_7",
    "question": "A block rests on the slope in <image 1>. What is the normal force in newtons?",
    "options": "['$5\\\\sqrt{3}$', '10', \"it's 20\", '5']",
    "explanation": "",
    "image_1": png(RED),
    "image_2": None,
    "answer": "A",
    "question_type": "multiple-choice",
    "subfield": "Mechanics",
}


def row(question, options="[]", **images):
    return {"id": "validation_Art_3", "question": question, "options": options, "answer": "A", **images}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmmu")
    write_mmmu_fixture(out, subjects=SUBJECTS, per_subject=6)
    return out


# ---------------------------------------------------------------- prompt format


def test_thirty_subjects():
    assert len(MMMU_SUBJECTS) == len(set(MMMU_SUBJECTS)) == 30
    assert {"Art_Theory", "Basic_Medical_Science", "Diagnostics_and_Laboratory_Medicine"} <= set(MMMU_SUBJECTS)


def test_vendor_prompt_for_a_known_row_is_exact():
    # as vLLM's chat server builds it from the vendor kit's interleaved message: the picture
    # first, the text pieces around the removed marker joined by a newline
    prompt, images = format_mmmu_question(KNOWN_ROW)
    assert prompt == (
        "<image>\nQuestion: A block rests on the slope in \n. What is the normal force in newtons?\n"
        "Options:\n"
        "A. $5\\sqrt{3}$\n"
        "B. 10\n"
        "C. it's 20\n"
        "D. 5\n"
        "Please select the correct answer from the options above. \n"
    )
    assert colours(images) == [RED]


def test_open_question_and_hint():
    assert pose_question("How many?") == "Question: How many?\n"
    assert pose_question("Which?", ["x", "y"], hint="Look closely") == (
        "Hint: Look closely\nQuestion: Which?\nOptions:\nA. x\nB. y\n"
        "Please select the correct answer from the options above. \n"
    )


def test_images_follow_marker_order_when_image_2_comes_first():
    prompt, images = format_mmmu_question(
        row("Compare <image 2> with <image 1>.", image_1=png(RED), image_2=png(GREEN))
    )
    assert prompt == "<image>\n<image>\nQuestion: Compare \n with \n.\n"
    assert colours(images) == [GREEN, RED]


def test_markers_in_options_count_too():
    prompt, images = format_mmmu_question(
        row("Which matches <image 3>?", "['<image 2>', '<image 1>']",
            image_1=png(RED), image_2=png(GREEN), image_3=png(BLUE))
    )
    # the piece between two adjacent markers ("\nB. ") stays; an empty piece would be dropped
    assert prompt.startswith("<image>\n<image>\n<image>\nQuestion: Which matches \n?\nOptions:\nA. \n\nB. \n\n")
    assert colours(images) == [BLUE, GREEN, RED]


def test_adjacent_markers_leave_no_empty_line():
    prompt, images = format_mmmu_question(row("<image 1><image 2> Which is larger?", image_1=png(RED), image_2=png(GREEN)))
    assert prompt == "<image>\n<image>\nQuestion: \n Which is larger?\n"
    assert colours(images) == [RED, GREEN]


def test_a_picture_named_twice_is_listed_twice_and_unnamed_ones_are_left_out():
    prompt, images = format_mmmu_question(
        row("<image 1> and again <image 1>", image_1=png(RED), image_2=png(GREEN))
    )
    assert prompt.count("<image>") == 2
    assert colours(images) == [RED, RED]


def test_without_markers_all_pictures_come_first():
    prompt, images = format_mmmu_question(row("What is shown?", image_1=png(RED), image_2=png(BLUE)))
    assert prompt == "<image>\n<image>\nQuestion: What is shown?\n"
    assert colours(images) == [RED, BLUE]


def test_pil_images_from_datasets_are_accepted_and_made_rgb():
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 255))
    _, images = format_mmmu_question(row("see <image 1>", image_1=rgba))
    assert images[0].mode == "RGB" and images[0].getpixel((0, 0)) == (1, 2, 3)


def test_bad_rows_are_user_errors():
    with pytest.raises(UserError, match="validation_Art_3 refers to <image 2>"):
        format_mmmu_question(row("see <image 2>", image_1=png(RED)))
    with pytest.raises(UserError, match="not a list literal"):
        parse_options("['a', ", "validation_Art_3")
    with pytest.raises(UserError, match="literal <image>"):
        format_mmmu_question(row("an <image> tag and <image 1>", image_1=png(RED)))
    assert parse_options("[]") == [] and parse_options(["a", 2]) == ["a", "2"]


# ---------------------------------------------------------------- stratified choice


def test_counts_are_as_even_as_possible_across_thirty_subjects():
    counts = stratified_counts({s: 30 for s in MMMU_SUBJECTS}, 128, seed=0)
    assert sum(counts.values()) == 128
    assert set(counts.values()) == {4, 5} and list(counts.values()).count(5) == 8


def test_small_subjects_give_what_they_have_and_the_rest_is_spread():
    counts = stratified_counts({"Art": 2, "Math": 30, "Physics": 30}, 31, seed=0)
    assert counts["Art"] == 2 and sorted([counts["Math"], counts["Physics"]]) == [14, 15]
    assert stratified_counts({"Art": 2, "Math": 3}, 50) == {"Art": 2, "Math": 3}


def test_choice_is_seeded_and_grows_by_adding_rows():
    subjects = [s for s in MMMU_SUBJECTS for _ in range(30)]
    assert choose_rows(subjects, 64, seed=1) == choose_rows(subjects, 64, seed=1)
    assert choose_rows(subjects, 64, seed=1) != choose_rows(subjects, 64, seed=2)
    assert set(choose_rows(subjects, 40, seed=1)) <= set(choose_rows(subjects, 90, seed=1))


# ---------------------------------------------------------------- loading parquet


def test_loading_is_deterministic_down_to_the_pixels(fixture_dir):
    def load():
        return [(s.id, s.prompt, s.answer, [im.tobytes() for im in s.images]) for s in load_mmmu(fixture_dir, 12, 4)]

    assert load() == load()
    assert [s.id for s in load_mmmu(fixture_dir, 12, 4)] != [s.id for s in load_mmmu(fixture_dir, 12, 5)]


def test_loading_is_stratified_and_stably_ordered(fixture_dir):
    samples = load_mmmu(fixture_dir, n=13, seed=0)
    counts = Counter(s.subject for s in samples)
    assert set(counts) == set(SUBJECTS) and max(counts.values()) - min(counts.values()) <= 1
    keys = [(MMMU_SUBJECTS.index(s.subject), int(s.id.rsplit("_", 1)[1])) for s in samples]
    assert keys == sorted(keys)


def test_fixture_rows_keep_mmmu_semantics(fixture_dir):
    samples = {s.id: s for s in load_mmmu(fixture_dir, n=1000)}
    assert len(samples) == 30
    reversed_pair = samples["validation_Math_2"]
    expected = fixture_row("Math", 2)
    assert reversed_pair.prompt.startswith("<image>\n<image>\nQuestion: Look at \n and then at \n.")
    assert [im.tobytes() for im in reversed_pair.images] == [
        Image.open(io.BytesIO(expected[k]["bytes"])).convert("RGB").tobytes() for k in ("image_2", "image_1")
    ]
    assert samples["validation_Math_3"].kind == "open" and samples["validation_Math_3"].options == []
    assert samples["validation_Math_1"].kind == "multiple-choice" and samples["validation_Math_1"].answer in "ABCD"


def test_flat_files_single_files_and_dev_test_files(fixture_dir, tmp_path):
    for subject in SUBJECTS:
        shutil.copy(fixture_dir / subject / "validation-00000-of-00001.parquet", tmp_path / f"{subject}.parquet")
    flat = load_mmmu(tmp_path, n=10)
    assert Counter(s.subject for s in flat) == {s: 2 for s in SUBJECTS}
    assert {s.id for s in load_mmmu(tmp_path / "Math.parquet", n=100)} == {f"validation_Math_{k}" for k in range(1, 7)}

    nested = tmp_path / "nested"
    shutil.copytree(fixture_dir, nested)
    shutil.copy(tmp_path / "Math.parquet", nested / "Math" / "test-00000-of-00001.parquet")
    assert len(load_mmmu(nested, n=1000)) == 30  # the test copy is ignored, not read twice


def test_bad_paths_and_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_mmmu(tmp_path / "missing")
    with pytest.raises(UserError, match="no MMMU validation parquet"):
        load_mmmu(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["validation_Art_1"], "question": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x\.parquet is not in MMMU's layout.*options, answer"):
        load_mmmu(tmp_path)


def test_fixture_reads_through_datasets_like_the_real_split(fixture_dir, tmp_path):
    import datasets

    files = sorted(str(p) for p in fixture_dir.glob("*/validation-*.parquet"))
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert isinstance(dataset.features["image_1"], datasets.Image)
    assert dataset.num_rows == 30
    ours = {s.id: s for s in load_mmmu(fixture_dir, n=1000)}
    for record in dataset:
        prompt, images = format_mmmu_question(record)
        assert prompt == ours[record["id"]].prompt
        assert [im.tobytes() for im in images] == [im.tobytes() for im in ours[record["id"]].images]


# ---------------------------------------------------------------- caches and offline


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def test_offline_without_data_fails_fast_and_names_calib_path(empty_caches, monkeypatch):
    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: probes.append(1) or False)
    start = time.monotonic()
    with pytest.raises(UserError, match="--calib-path") as error:
        load_mmmu(n=8)
    assert time.monotonic() - start < 10
    assert probes == [1]  # asked once, not once per subject
    assert str(error.value).count(". ") == 0  # one sentence


def test_mmmu_files_in_the_hub_cache_are_found(empty_caches, fixture_dir, monkeypatch):
    snapshot = empty_caches / "hub" / "datasets--MMMU--MMMU" / "snapshots" / "abc123"
    shutil.copytree(fixture_dir, snapshot)
    monkeypatch.setattr(hub, "hub_reachable", lambda: pytest.fail("the network was asked"))
    assert [s.id for s in load_mmmu(n=5)] == [s.id for s in load_mmmu(fixture_dir, n=5)]


def fake_hub(fixture_dir, monkeypatch, cached, subjects=SUBJECTS):
    """datasets.load_dataset stand-in: serves fixture subjects, from 'cache' only if cached."""
    import datasets
    import datasets.config

    real = datasets.load_dataset
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        offline = datasets.config.HF_HUB_OFFLINE
        calls.append((path, name, offline))
        if offline and not cached:
            raise ConnectionError("not cached")
        if name not in subjects:
            raise FileNotFoundError(name)
        file = str(fixture_dir / name / "validation-00000-of-00001.parquet")
        return real("parquet", data_files=[file], split="train", cache_dir=str(fixture_dir.parent / "ds-cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_datasets_cache_is_read_without_the_network(empty_caches, fixture_dir, monkeypatch):
    calls = fake_hub(fixture_dir, monkeypatch, cached=True)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    samples = load_mmmu(n=10, seed=3)
    assert [s.id for s in samples] == [s.id for s in load_mmmu(fixture_dir, n=10, seed=3)]
    assert all(offline for _, _, offline in calls) and len(calls) == 30


def test_datasets_downloads_only_when_the_hub_answers(empty_caches, monkeypatch):
    every_subject = empty_caches / "all"
    write_mmmu_fixture(every_subject, per_subject=2)
    calls = fake_hub(every_subject, monkeypatch, cached=False, subjects=MMMU_SUBJECTS)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    samples = load_mmmu(n=45)
    assert sorted(Counter(s.subject for s in samples).values()) == [1] * 15 + [2] * 15
    assert [offline for _, _, offline in calls] == [True, False] * 30


def test_a_failed_download_is_a_user_error(empty_caches, fixture_dir, monkeypatch):
    fake_hub(fixture_dir, monkeypatch, cached=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    with pytest.raises(UserError, match=r"could not load MMMU/MMMU \(Agriculture\)"):
        load_mmmu(n=4)
