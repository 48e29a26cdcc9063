"""Image loading and InternVL-style dynamic tiling into normalised pixel tensors.

The vision encoder was trained on 448x448 tiles cut from a bicubic resize of the image to
the grid whose aspect ratio is closest to the image's, plus a thumbnail of the whole image.
Reproducing that rule exactly matters: a different grid gives the LLM a different number
of visual tokens and different pixels than the model (and vLLM serving it) expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from r1v_quant.errors import UserError
from r1v_quant.model.config import R1VConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, decoding it fully so a broken file fails here."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if not path.is_file():
        raise UserError(f"{path} is not a file, so it cannot be read as an image.")
    try:
        with Image.open(path) as img:
            # The reference preprocessing does a plain RGB conversion (no EXIF rotation,
            # alpha dropped), so we do the same to feed the model what it was trained on.
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image format Pillow can read.") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path} has too many pixels to load safely.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path} could not be decoded as an image ({e}).") from None


def _check_tile_bounds(min_tiles: int, max_tiles: int) -> None:
    if min_tiles < 1 or max_tiles < min_tiles:
        raise UserError(
            f"The tile bounds min_dynamic_patch={min_tiles}, max_dynamic_patch={max_tiles} are invalid; "
            "they need 1 <= min_dynamic_patch <= max_dynamic_patch."
        )


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) grid with min_tiles <= cols*rows <= max_tiles, smallest area first."""
    _check_tile_bounds(min_tiles, max_tiles)
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    # Grids of equal area keep Python's set order, because the reference implementations
    # (InternVL, vLLM) enumerate them the same way. With min_tiles=1 that order never
    # changes the chosen grid; with min_tiles>1 it decides rare exact ties.
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (cols, rows) grid an image of this size is tiled into."""
    if width <= 0 or height <= 0:
        raise UserError(f"An image of {width}x{height} pixels has no area to tile.")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        # On an exact tie the larger grid wins only when the image has the pixels to fill
        # at least half of it; small images are not blown up into many tiles.
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def tile_image(
    image: Image.Image,
    tile_size: int,
    min_tiles: int,
    max_tiles: int,
    use_thumbnail: bool,
    dynamic: bool = True,
) -> list[Image.Image]:
    """Cut an image into tile_size squares, row by row, plus a thumbnail when there are several."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if not dynamic:
        return [_resize(image, (tile_size, tile_size))]
    cols, rows = closest_grid(image.width, image.height, min_tiles, max_tiles, tile_size)
    resized = _resize(image, (tile_size * cols, tile_size * rows))
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(_resize(image, (tile_size, tile_size)))
    return tiles


def normalize(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """Stack equal-sized RGB tiles into [n, 3, H, W] float32, scaled to [0, 1] and ImageNet-normalised."""
    if not tiles:
        raise ValueError("normalize needs at least one tile.")
    arrays = [np.asarray(t if t.mode == "RGB" else t.convert("RGB"), dtype=np.uint8) for t in tiles]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"normalize needs tiles of one size, got shapes {sorted(shapes)}.")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(mean).div(std).contiguous()


def preprocess(images: Sequence[Image.Image | str | Path], cfg: R1VConfig) -> tuple[torch.Tensor, list[int]]:
    """Tile and normalise images for the vision encoder.

    Returns all tiles stacked as [sum(tiles_per_image), 3, S, S] float32, and how many tiles
    each image contributed (the prompt needs 256 context tokens per tile).
    """
    size = cfg.image_size
    pixel_batches: list[torch.Tensor] = []
    tiles_per_image: list[int] = []
    for item in images:
        image = item if isinstance(item, Image.Image) else load_image(item)
        tiles = tile_image(
            image,
            size,
            cfg.min_dynamic_patch,
            cfg.max_dynamic_patch,
            cfg.use_thumbnail,
            dynamic=cfg.dynamic_image_size,
        )
        pixel_batches.append(normalize(tiles))
        tiles_per_image.append(len(tiles))
    if not pixel_batches:
        return torch.empty(0, 3, size, size, dtype=torch.float32), []
    return torch.cat(pixel_batches, dim=0), tiles_per_image
