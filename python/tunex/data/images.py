"""Images for multimodal training: decoding and the vision tower's preprocessing.

The steps and their order follow the tower's ``preprocessor_config.json`` (CLIP's and SigLIP's
image processors): RGB (transparency composited on white) -> (LLaVA-1.5: pad to a square with
the mean colour) -> resize (shortest edge, or to height x width) with PIL's filter -> center crop ->
rescale (x 1/255) -> normalize ((x - mean) / std). Pixel values come out as float32 (3, H, W),
equal to transformers' image processors' for the same image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunex.errors import DataError, FormatError

IMAGE_ASPECTS = ("pad", "resize")  # LLaVA-1.5's pad-to-square, or the processor's own steps only
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3


@dataclass
class ImageProcessing:
    """What a ``preprocessor_config.json`` asks for (defaults: CLIP's)."""

    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the shorter side to this (keeping the aspect) ...
    height: int | None = None  # ... or to height x width
    width: int | None = None
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    raw: dict | None = None

    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if self.height and self.width:
            return self.height, self.width
        raise FormatError("preprocessor_config.json: without a center crop, size needs 'height' and 'width'")


def processing_from_dict(raw: dict, source: str = "preprocessor_config.json") -> ImageProcessing:
    def size_of(value: Any, key: str) -> dict:
        if isinstance(value, int):
            return {"height": value, "width": value}
        if not isinstance(value, dict):
            raise FormatError(f"{source}: {key}: expected an object like {{'shortest_edge': 224}}, got {value!r}")
        return value

    p = ImageProcessing(raw=dict(raw))
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if key in raw:
            setattr(p, key, bool(raw[key]))
    if "size" in raw:
        size = size_of(raw["size"], "size")
        p.shortest_edge = size.get("shortest_edge")
        p.height, p.width = size.get("height"), size.get("width")
        if p.shortest_edge is None and not (p.height and p.width):
            raise FormatError(f"{source}: size: expected 'shortest_edge' or 'height' and 'width', got {size}")
    if "crop_size" in raw:
        crop = size_of(raw["crop_size"], "crop_size")
        p.crop_height, p.crop_width = int(crop.get("height", 0)), int(crop.get("width", 0))
    p.resample = int(raw.get("resample", p.resample))
    p.rescale_factor = float(raw.get("rescale_factor", p.rescale_factor))
    for key in ("image_mean", "image_std"):
        if key in raw:
            value = raw[key]
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise FormatError(f"{source}: {key}: expected 3 numbers (one per RGB channel), got {raw[key]!r}")
            setattr(p, key, tuple(float(x) for x in value))
    p.output_size()
    return p


def read_processing(folder: Path) -> ImageProcessing:
    """The tower folder's ``preprocessor_config.json``."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: the vision tower's folder must hold its image processor's config"
        ) from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    return processing_from_dict(raw, str(path))


def open_image(path: str | Path):
    """Decode an image file as a PIL RGB image (transparency composited on white).

    Raises:
        DataError naming the file when it is missing or not an image Pillow can decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not an image Pillow can decode ({exc})") from None


def to_rgb(img):
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pad_to_square(pixels: np.ndarray, mean: tuple[float, ...]) -> np.ndarray:
    """(3, H, W) uint8 -> (3, S, S), S = max(H, W), the image centred on the mean colour (LLaVA-1.5)."""
    _, h, w = pixels.shape
    if h == w:
        return pixels
    side = max(h, w)
    out = np.empty((pixels.shape[0], side, side), dtype=pixels.dtype)
    out[:] = np.array([int(m * 255) for m in mean], dtype=pixels.dtype)[:, None, None]
    if w > h:
        top = (side - h) // 2
        out[:, top : top + h] = pixels
    else:
        left = (side - w) // 2
        out[:, :, left : left + w] = pixels
    return out


def _resized_size(p: ImageProcessing, h: int, w: int) -> tuple[int, int]:
    if p.shortest_edge:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = p.shortest_edge, int(p.shortest_edge * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    return int(p.height), int(p.width)


def _center_crop(pixels: np.ndarray, ch: int, cw: int) -> np.ndarray:
    _, h, w = pixels.shape
    if h < ch or w < cw:  # too small: pad with zeros around it first
        new_h, new_w = max(h, ch), max(w, cw)
        grown = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        grown[:, top : top + h, left : left + w] = pixels
        pixels, h, w = grown, new_h, new_w
    top, left = (h - ch) // 2, (w - cw) // 2
    return pixels[:, top : top + ch, left : left + cw]


def preprocess(image, p: ImageProcessing, aspect: str = "resize") -> np.ndarray:
    """One PIL image (or (H, W, 3) uint8 array) -> float32 pixel values (3, H, W).

    ``aspect = "pad"``: first pad to a square with the mean colour (LLaVA-1.5's ``image_aspect_ratio =
    "pad"``), so nothing of a wide or tall image is cropped away.
    """
    from PIL import Image

    if aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image aspect {aspect!r}: expected one of {', '.join(IMAGE_ASPECTS)}")
    rgb = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image, dtype=np.uint8)
    pixels = np.moveaxis(rgb, -1, 0)  # (3, H, W)
    if aspect == "pad":
        pixels = pad_to_square(pixels, p.image_mean)
    if p.do_resize:
        h, w = _resized_size(p, pixels.shape[1], pixels.shape[2])
        img = Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels, 0, -1)))
        pixels = np.moveaxis(np.asarray(img.resize((w, h), resample=p.resample)), -1, 0)
    if p.do_center_crop:
        pixels = _center_crop(pixels, p.crop_height, p.crop_width)
    out = pixels.astype(np.float32)
    if p.do_rescale:
        out = (pixels.astype(np.float64) * p.rescale_factor).astype(np.float32)
    if p.do_normalize:
        mean = np.array(p.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(p.image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def pixel_values(paths, p: ImageProcessing, aspect: str = "resize"):
    """Stacked pixel values (N, 3, H, W) float32 tensor of image files."""
    import torch

    arrays = [preprocess(open_image(path), p, aspect) for path in paths]
    if not arrays:
        h, w = p.output_size()
        return torch.empty((0, 3, h, w))
    return torch.from_numpy(np.stack(arrays))
