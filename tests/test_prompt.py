"""Image placeholders, thinking split, embedding merge and image-safe truncation."""

from __future__ import annotations

import pytest
import torch

from r1v_quant.errors import UserError
from r1v_quant.model.prompt import (
    IMG_CONTEXT,
    IMG_END,
    expand_image_placeholders,
    merge_image_embeddings,
    split_thinking,
    truncate_tokens,
)


def test_single_image_block_is_exact():
    assert expand_image_placeholders("<image>\nWhat?", [1], 2) == (
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat?"
    )


def test_expansion_counts_follow_tiles_in_order():
    out = expand_image_placeholders("A <image> B <image> C", [3, 1], 256)
    assert out.count(IMG_CONTEXT) == 256 * 4
    first, second = out.split(IMG_END)[:2]
    assert first.count(IMG_CONTEXT) == 768 and second.count(IMG_CONTEXT) == 256
    assert out.startswith("A <img>") and out.endswith("</img> C")
    assert "<image>" not in out


def test_images_without_placeholders_go_first_one_per_line():
    out = expand_image_placeholders("Describe.", [1, 2], 1)
    assert out == (
        "<img><IMG_CONTEXT></img>\n"
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Describe."
    )


def test_no_images_leaves_text_alone():
    assert expand_image_placeholders("plain text", [], 256) == "plain text"


@pytest.mark.parametrize("text, tiles", [("<image><image>", [1]), ("<image>", []), ("<image> x", [1, 1])])
def test_placeholder_count_mismatch_is_user_error(text, tiles):
    with pytest.raises(UserError, match=f"{text.count('<image>')} <image> placeholder"):
        expand_image_placeholders(text, tiles, 256)


@pytest.mark.parametrize(
    "reply, thinking, answer",
    [
        ("<think>\nAdd 2 and 2.\n</think>\n\nThe answer is \\boxed{4}.", "Add 2 and 2.", "The answer is \\boxed{4}."),
        # the generation prompt already held `<think>\n`, so the reply starts inside the thinking
        ("Add 2 and 2.\n</think>\n\n\\boxed{4}", "Add 2 and 2.", "\\boxed{4}"),
        # cut off before `</think>`: all thinking, no answer
        ("<think>\nFirst, the bar chart shows", "First, the bar chart shows", ""),
        ("Still thinking", "Still thinking", ""),
        # the first `</think>` closes the thinking; anything after is answer
        ("a</think>b</think>c", "a", "b</think>c"),
        ("<think>\n\n</think>\n\nB", "", "B"),
    ],
)
def test_split_thinking(reply, thinking, answer):
    assert split_thinking(reply) == (thinking, answer)


def test_merge_replaces_context_positions_in_order():
    ctx = 7
    ids = torch.tensor([[1, ctx, ctx, 2, 3], [ctx, 4, 5, ctx, 6]])
    embeds = torch.zeros(2, 5, 3)
    image = torch.arange(1, 13, dtype=torch.float32).view(4, 3)
    out = merge_image_embeddings(embeds, ids, image, ctx)
    assert torch.equal(out[0, 1], image[0]) and torch.equal(out[0, 2], image[1])
    assert torch.equal(out[1, 0], image[2]) and torch.equal(out[1, 3], image[3])
    text_positions = ids != ctx
    assert torch.equal(out[text_positions], torch.zeros(int(text_positions.sum()), 3))
    assert torch.equal(embeds, torch.zeros(2, 5, 3))  # the input is not modified


def test_merge_casts_to_the_embedding_dtype():
    ids = torch.tensor([[5, 9]])
    out = merge_image_embeddings(torch.zeros(1, 2, 2, dtype=torch.bfloat16), ids, torch.ones(1, 2), 9)
    assert out.dtype == torch.bfloat16 and out[0, 1].tolist() == [1.0, 1.0]


def test_merge_count_mismatch_names_both_counts():
    ids = torch.tensor([[9, 9, 1]])
    with pytest.raises(ValueError, match="2 image context tokens but 3 image embeddings"):
        merge_image_embeddings(torch.zeros(1, 3, 4), ids, torch.zeros(3, 4), 9)


S, C, E = 100, 101, 102
IDS = [1, 2, S, C, C, E, 3, 4, S, C, E, 5]


@pytest.mark.parametrize(
    "max_len, expected",
    [
        (20, IDS),
        (12, IDS),
        (7, [1, 2, S, C, C, E, 3]),
        (6, [1, 2, S, C, C, E]),     # the block ends exactly at the cut: kept
        (5, [1, 2]),                 # the cut falls inside the block: it goes entirely
        (3, [1, 2]),                 # only `<img>` would fit
        (2, [1, 2]),
        (10, [1, 2, S, C, C, E, 3, 4]),
        (0, []),
    ],
)
def test_truncate_drops_whole_image_blocks(max_len, expected):
    assert truncate_tokens(IDS, max_len, S, E) == expected


def test_truncate_never_leaves_a_partial_block():
    for max_len in range(len(IDS) + 2):
        out = truncate_tokens(IDS, max_len, S, E)
        assert len(out) <= max_len and out == IDS[: len(out)]
        assert out.count(S) == out.count(E)
        assert out[-1:] != [S] and (not out or out[-1] != C)


def test_truncate_rejects_negative_length():
    with pytest.raises(ValueError):
        truncate_tokens(IDS, -1, S, E)
