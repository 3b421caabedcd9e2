"""Image transforms: per-example augmentation on PIL images, per-batch normalization and mixing.

Every per-example op is a small frozen dataclass called as `op(img, rng)` (PIL
image in, PIL image out; `rng` a `np.random.Generator`, None for the
deterministic eval ops). Ops are plain picklable objects so grain worker
processes can receive them. Sizes are `(height, width)`; PIL wants `(width,
height)`, converted at the call.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BILINEAR = Image.Resampling.BILINEAR
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fill for geometric RandAugment ops: the ImageNet mean pixel, as timm uses.
_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def open_image(x, draft: tuple[int, int] | None = None) -> Image.Image:
    """An RGB PIL image from a path or a uint8 HWC/HW array.

    `draft`: the (height, width) the first transform needs at least. JPEG files
    are then decoded at a reduced DCT scale (never below it), several times
    faster for large photos that are resized down anyway.
    """
    if isinstance(x, np.ndarray):
        return Image.fromarray(x).convert("RGB")
    with Image.open(x) as img:
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft[1], draft[0]))
        return img.convert("RGB")


def to_array(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (*size, 3):  # a transform list that does not end at `size` is a bug
        raise ValueError(f"transform produced {arr.shape}, expected {(*size, 3)}")
    return arr


@dataclasses.dataclass(frozen=True)
class Resize:
    """Resize to exactly `size` (no-op when already there)."""
    size: tuple[int, int]

    def __call__(self, img, rng=None):
        want = (self.size[1], self.size[0])
        return img if img.size == want else img.resize(want, BILINEAR)


@dataclasses.dataclass(frozen=True)
class ResizeCover:
    """Resize, aspect kept, to the smallest size covering `size` (for a square `size`: the
    shorter side becomes `size`; the usual "resize 256" before a 224 crop)."""
    size: tuple[int, int]

    @property
    def draft(self) -> tuple[int, int]:
        return self.size

    def __call__(self, img, rng=None):
        w, h = img.size
        s = max(self.size[0] / h, self.size[1] / w)
        want = (max(self.size[1], round(w * s)), max(self.size[0], round(h * s)))
        return img if img.size == want else img.resize(want, BILINEAR, reducing_gap=3.0)


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    size: tuple[int, int]

    def __call__(self, img, rng=None):
        w, h = img.size
        x0, y0 = (w - self.size[1]) // 2, (h - self.size[0]) // 2
        return img.crop((x0, y0, x0 + self.size[1], y0 + self.size[0]))


@dataclasses.dataclass(frozen=True)
class PadCrop:
    """Random `size` crop of the image zero-padded by `pad` on each side (a random shift).

    PIL fills a crop box that leaves the image with zeros, so padding costs nothing.
    """
    size: tuple[int, int]
    pad: int

    def __call__(self, img, rng):
        w, h = img.size
        x0 = int(rng.integers(-self.pad, w - self.size[1] + self.pad + 1))
        y0 = int(rng.integers(-self.pad, h - self.size[0] + self.pad + 1))
        return img.crop((x0, y0, x0 + self.size[1], y0 + self.size[0]))


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's RandomResizedCrop: a random area/aspect box resized to `size`."""
    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, img, rng):
        w, h = img.size
        area = w * h
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(*log_r))
            cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                break
        else:  # fall back to the largest centre box within the ratio range
            if w / h < self.ratio[0]:
                cw, ch = w, round(w / self.ratio[0])
            elif w / h > self.ratio[1]:
                cw, ch = round(h * self.ratio[1]), h
            else:
                cw, ch = w, h
            x0, y0 = (w - cw) // 2, (h - ch) // 2
        return img.resize((self.size[1], self.size[0]), BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


@dataclasses.dataclass(frozen=True)
class RandomCrop:
    size: tuple[int, int]

    def __call__(self, img, rng):
        w, h = img.size
        x0 = int(rng.integers(0, w - self.size[1] + 1))
        y0 = int(rng.integers(0, h - self.size[0] + 1))
        return img.crop((x0, y0, x0 + self.size[1], y0 + self.size[0]))


@dataclasses.dataclass(frozen=True)
class Flip:
    """Random horizontal (and, with `vertical`, vertical) flip, each with p = 0.5."""
    vertical: bool = False

    def __call__(self, img, rng):
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.vertical and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return img


@dataclasses.dataclass(frozen=True)
class Rotate:
    """Random rotation in [-degrees, degrees], corners filled black (torchvision's default)."""
    degrees: float

    def __call__(self, img, rng):
        return img.rotate(rng.uniform(-self.degrees, self.degrees), BILINEAR)


@dataclasses.dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast and saturation factors in [1-s, 1+s], applied in random order."""
    strength: float

    def __call__(self, img, rng):
        for k in rng.permutation(3):
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[k]
            img = enhancer(img).enhance(rng.uniform(1 - self.strength, 1 + self.strength))
        return img


def _signed(v, rng):
    return v if rng.random() < 0.5 else -v


def _affine(img, coeffs):
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, BILINEAR, fillcolor=_FILL)


# timm's RandAugment op set; `m` is the magnitude on timm's 0..10 scale.
_RAND_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(30 * m / 10, rng), BILINEAR, fillcolor=_FILL),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, 8 - round(4 * m / 10)),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - round(256 * m / 10)),
    "SolarizeAdd": lambda img, m, rng: Image.fromarray(np.where(
        np.asarray(img) < 128, np.minimum(np.asarray(img, np.int16) + round(110 * m / 10), 255),
        np.asarray(img)).astype(np.uint8)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(0.3 * m / 10, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.3 * m / 10, rng), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(img, (1, 0, _signed(0.45 * m / 10, rng) * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m / 10, rng) * img.size[1])),
}


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm-style RandAugment: `n` ops drawn uniformly, each applied with p = 0.5 at magnitude `m`."""
    n: int = 2
    m: float = 5

    def __call__(self, img, rng):
        names = list(_RAND_OPS)
        for k in rng.integers(0, len(names), size=self.n):
            if rng.random() < 0.5:
                img = _RAND_OPS[names[k]](img, self.m, rng)
        return img


def draft_size(ops: Sequence) -> tuple[int, int] | None:
    """How small a JPEG may be decoded: only when the first op resizes the whole image."""
    return getattr(ops[0], "draft", None) if ops else None


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 (x/255 - mean) / std, in one fused pass."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    return images.astype(np.float32) * scale - shift


def mix(batch: dict, rng: np.random.Generator, num_classes: int, mixup: float, cutmix: float) -> dict:
    """MixUp / CutMix on a normalized batch (timm's pairing: each example with its mirror in the batch).

    With both enabled, each batch uses one of them with p = 0.5. Labels become
    float32 (B, num_classes) soft targets. Padding rows (mask 0) take no part.
    """
    image, label, mask = batch["image"], batch["label"], batch["mask"]
    soft = np.eye(num_classes, dtype=np.float32)[label]
    real = np.flatnonzero(mask > 0)
    partner = np.arange(len(label))
    partner[real] = real[::-1]
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    if use_cutmix:
        h, w = image.shape[1:3]
        ch, cw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        image = image.copy()
        image[:, y0:y1, x0:x1] = image[partner, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the pasted box, after clipping
    else:
        image = (lam * image + (1 - lam) * image[partner]).astype(np.float32)
    soft = (lam * soft + (1 - lam) * soft[partner]).astype(np.float32)
    return {**batch, "image": image, "label": soft}
