"""TEST-ONLY: the few `torchvision.transforms` names vLLM's InternVL image processor uses (see __init__.py).

Semantics follow torchvision for PIL inputs:
- Resize((h, w), interpolation): PIL `Image.resize((w, h), resample)`;
- ToTensor: uint8 HWC -> float32 CHW divided by 255;
- Normalize(mean, std): (x - mean) / std per channel, in float32.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_FILTER = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Resize:
    """Only the form vLLM uses: an explicit (height, width) and a PIL image."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        if isinstance(size, int) or len(size) != 2:
            raise NotImplementedError("the test stand-in supports Resize((height, width)) only")
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            raise NotImplementedError("the test stand-in resizes PIL images only")
        h, w = self.size
        return img.resize((w, h), _PIL_FILTER[self.interpolation])


class ToTensor:
    def __call__(self, pic):
        if not isinstance(pic, Image.Image):
            raise NotImplementedError("the test stand-in converts PIL images only")
        if pic.mode != "RGB":
            raise NotImplementedError("the test stand-in converts RGB images only")
        arr = np.asarray(pic, dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def __call__(self, tensor):
        return tensor.sub(self.mean[:, None, None]).div(self.std[:, None, None])
