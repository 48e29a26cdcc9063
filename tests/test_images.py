"""Dynamic tiling and pixel normalisation, checked against hand-worked grids and values."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from r1v_quant.errors import UserError
from r1v_quant.model.config import parse_config
from r1v_quant.model.images import candidate_grids, closest_grid, load_image, normalize, preprocess, tile_image

T = 448


def _cfg(**top):
    raw = {
        "model_type": "skywork_chat",
        "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 32},
        **top,
    }
    return parse_config(raw)


@pytest.mark.parametrize(
    "size, grid",
    [
        ((448, 448), (1, 1)),     # exact match; (2,2) ties but the image is too small for it
        ((896, 448), (2, 1)),     # exact 2:1; (4,2) ties but is too large
        ((1000, 300), (3, 1)),    # 3.33: 3:1 beats 4:1 and 5:2; (6,2) ties but is too large
        ((300, 1000), (1, 3)),    # 0.3: 1:3 (diff .033) beats 1:4 (diff .05)
        ((896, 896), (2, 2)),     # ties with (1,1): area 802816 > half of 4 tiles (401408)
        ((1344, 448), (3, 1)),    # (6,2) ties but 602112 < half of 12 tiles (1204224)
        ((2688, 896), (6, 2)),    # (6,2) ties and 2408448 > 1204224, so the larger grid wins
        ((10000, 10), (12, 1)),   # extreme ratio: the widest grid allowed
    ],
)
def test_closest_grid_hand_worked(size, grid):
    assert closest_grid(*size, 1, 12, T) == grid


def test_closest_grid_near_ratio():
    # 1.25 is closest to 4:3 (1.333, diff .083) among grids of at most 12 tiles; 5:4 needs 20
    assert closest_grid(500, 400, 1, 12, T) == (4, 3)


def test_closest_grid_bounds():
    assert closest_grid(4000, 1000, 1, 1, T) == (1, 1)
    assert closest_grid(4000, 1000, 1, 2, T) == (2, 1)
    # at least 2 tiles: a square image must still be split
    assert closest_grid(448, 448, 2, 2, T) == (1, 2)
    cols, rows = closest_grid(3000, 2000, 1, 6, T)
    assert cols * rows <= 6 and (cols, rows) == (3, 2)


def test_equal_area_order_matches_reference():
    # With min=max=4 a 5:2 image ties (4,1) and (2,2) (both differ by 1.5); the reference
    # implementations keep their set order for equal areas, which lands on (4,1).
    assert closest_grid(5, 2, 4, 4, T) == (4, 1)


def test_candidate_grids_sorted_by_area_and_bounded():
    grids = candidate_grids(2, 6)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)
    assert min(areas) == 2 and max(areas) == 6
    assert len(grids) == len(set(grids)) == sum(1 for c in range(1, 7) for r in range(1, 7) if 2 <= c * r <= 6)


@pytest.mark.parametrize("lo, hi", [(0, 4), (5, 4), (-1, 1)])
def test_bad_tile_bounds_are_user_errors(lo, hi):
    with pytest.raises(UserError, match="max_dynamic_patch"):
        closest_grid(100, 100, lo, hi, T)


def test_zero_size_image_is_user_error():
    with pytest.raises(UserError, match="no area"):
        closest_grid(0, 10, 1, 12, T)


def test_tile_counts_and_thumbnail():
    wide = Image.new("RGB", (896, 448), (10, 20, 30))
    assert len(tile_image(wide, T, 1, 12, use_thumbnail=True)) == 3
    assert len(tile_image(wide, T, 1, 12, use_thumbnail=False)) == 2
    square = Image.new("RGB", (448, 448))
    assert len(tile_image(square, T, 1, 12, use_thumbnail=True)) == 1  # one tile: no thumbnail
    fixed = tile_image(wide, T, 1, 12, use_thumbnail=True, dynamic=False)
    assert len(fixed) == 1 and fixed[0].size == (T, T)
    assert all(t.size == (T, T) for t in tile_image(Image.new("RGB", (1000, 300)), T, 1, 12, True))


def test_tiles_are_cut_row_by_row():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    img = Image.new("RGB", (2 * T, 2 * T))
    for k, colour in enumerate(colours):
        r, c = divmod(k, 2)
        img.paste(colour, (c * T, r * T, (c + 1) * T, (r + 1) * T))
    tiles = tile_image(img, T, 1, 12, use_thumbnail=True)
    assert len(tiles) == 5
    for tile, colour in zip(tiles[:4], colours):
        assert tile.getpixel((T // 2, T // 2)) == colour
    # the thumbnail is the whole image shrunk: its quadrants keep the layout
    assert tiles[4].getpixel((T // 4, T // 4)) == colours[0]
    assert tiles[4].getpixel((3 * T // 4, 3 * T // 4)) == colours[3]


def test_normalize_exact_values():
    tile = Image.new("RGB", (T, T), (255, 0, 128))
    x = normalize([tile])
    assert x.shape == (1, 3, T, T) and x.dtype == torch.float32
    # (v/255 - mean) / std per channel, worked by hand
    expected = torch.tensor([(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.2489083, -2.0357143, 0.4264924]), atol=1e-6)
    assert torch.equal(x.amin(dim=(2, 3)), x.amax(dim=(2, 3)))  # uniform stays uniform


def test_normalize_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="one size"):
        normalize([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])


def test_preprocess_stacks_images_with_tile_counts():
    cfg = _cfg(max_dynamic_patch=6, use_thumbnail=True)
    images = [Image.new("RGB", (896, 448), (0, 0, 0)), Image.new("RGB", (448, 448), (255, 255, 255))]
    pixels, tiles = preprocess(images, cfg)
    assert tiles == [3, 1]
    assert pixels.shape == (4, 3, T, T) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[3, 0, 0, 0], torch.tensor((1 - 0.485) / 0.229))
    assert torch.allclose(pixels[0, 2, 0, 0], torch.tensor(-0.406 / 0.225))


def test_preprocess_without_dynamic_tiling_and_empty():
    cfg = _cfg(dynamic_image_size=False)
    pixels, tiles = preprocess([Image.new("RGB", (1000, 300))], cfg)
    assert tiles == [1] and pixels.shape == (1, 3, T, T)
    pixels, tiles = preprocess([], cfg)
    assert tiles == [] and pixels.shape == (0, 3, T, T)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (7, 5), 200).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5) and img.getpixel((0, 0)) == (200, 200, 200)


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(UserError, match="missing.png does not exist"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="notes.png is not an image"):
        load_image(text)
    with pytest.raises(UserError, match="is not a file"):
        load_image(tmp_path)
    good = tmp_path / "full.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match="cut.png"):
        load_image(cut)
