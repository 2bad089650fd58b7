"""Loading user images safely, and the visual tokenizer's preprocessing (written with PIL + torch)."""
from __future__ import annotations

import io
import os
import warnings
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB
MAX_IMAGE_PIXELS = 40_000_000  # about 6300 x 6300
MIN_IMAGE_SIDE = 8

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used, with a message fit to show to a person."""


def load_image(
    source: ImageInput, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open a path, bytes, PIL image or HxWx3 array as an RGB PIL image, or raise ImageError.

    Checks size on disk and the pixel count *before* decoding, so a decompression bomb is refused
    without being decompressed.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise ImageError(f"an image array must be HxW or HxWxC, got shape {source.shape}")
        image = Image.fromarray(source.astype(np.uint8) if source.dtype != np.uint8 else source)
    else:
        if isinstance(source, (bytes, bytearray)):
            data, name = bytes(source), "the uploaded data"
        else:
            path = os.fspath(source)
            name = os.path.basename(path) or "the picture"  # messages never show a server's folders
            if not os.path.isfile(path):
                raise ImageError(f"image file not found: {name}")
            size = os.path.getsize(path)
            if size == 0:
                raise ImageError(f"{name} is empty: not a picture")
            if size > max_bytes:
                raise ImageError(f"{name} is {size / 2**20:.1f} MiB; images up to {max_bytes / 2**20:.0f} MiB are accepted")
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(f"the image is {len(data) / 2**20:.1f} MiB; images up to {max_bytes / 2**20:.0f} MiB are accepted")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                w, h = image.size
                if w * h > max_pixels:
                    raise ImageError(f"the image is {w}x{h} pixels; at most {max_pixels:,} pixels are accepted")
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name} is too large to decode safely (decompression bomb guard)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name} is not a readable image ({type(e).__name__})") from None
    w, h = image.size
    if w * h > max_pixels:
        raise ImageError(f"the image is {w}x{h} pixels; at most {max_pixels:,} pixels are accepted")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageError(f"the image is {w}x{h} pixels; each side must be at least {MIN_IMAGE_SIDE}")
    return _as_shown(image)


MAX_ASPECT = 4.0  # a longer side than this many times the shorter is letterboxed, not squashed to a square
MAX_STRIP_SIDE = 2048  # a strip is first shrunk to this long side, so its letterbox stays small


def _as_shown(image: Image.Image) -> Image.Image:
    """The picture as a photo viewer shows it, in 8-bit RGB: turned upright by its EXIF orientation, the first
    frame of an animation, 16-bit and float greys scaled (not clipped to white), transparency over white, CMYK
    and palettes converted, and a very long strip letterboxed on white to at most ``MAX_ASPECT``:1."""
    from PIL import ImageOps

    try:
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, TypeError, SyntaxError):  # a broken EXIF block: show it as stored
        pass
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        deep = image.mode.startswith("I;16") or image.mode == "F" or arr.max(initial=0) > 255
        if image.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif deep and image.mode != "F":
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa") or "transparency" in image.info:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        if max(w, h) > MAX_STRIP_SIDE:  # a thin strip's white canvas would be far larger than the strip
            scale = MAX_STRIP_SIDE / max(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
            w, h = image.size
        side = int(np.ceil(max(w, h) / MAX_ASPECT))
        canvas = Image.new("RGB", (w, side) if w > h else (side, h), (255, 255, 255))
        canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        image = canvas
    return image


class ImageProcessor:
    """Squash-resize to ``image_size`` x ``image_size`` (bilinear, as torchvision's Resize on PIL does)
    and normalize with CLIP mean/std: the release's ``qwen_448_transform``."""

    def __init__(self, image_size: int = 448, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, images: Union[Image.Image, Iterable[Image.Image]]) -> torch.Tensor:
        """PIL image(s) -> float tensor [B, 3, image_size, image_size]."""
        if isinstance(images, Image.Image):
            images = [images]
        out = []
        for image in images:
            image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            out.append((x - self.mean) / self.std)
        return torch.stack(out)
