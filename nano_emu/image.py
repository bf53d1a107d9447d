"""Image pre/post-processing as Emu3's released image processor does it (`Emu3VisionVQImageProcessor`).

PIL image -> RGB -> `smart_resize` (sides multiples of the VQ's spatial factor 8, area between 512^2 and 1024^2,
aspect ratio kept, bicubic) -> float pixels in [-1, 1], (3, H, W); and back: [-1, 1] -> uint8 RGB PIL image.
Every limit is a keyword, so toy images can pass through unchanged (e.g. min_pixels=0 for 64x64 shapes).

Before either family's processing, `upright_8bit` brings any file to what a viewer shows: the EXIF orientation
applied (as transformers' `load_image` does) and 16/32-bit greyscale scaled to 8 bits. PIL's plain convert("RGB"),
which both released processors call, clips those instead: a 50%-grey 16-bit PNG would be read as pure white.
"""

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

MIN_PIXELS, MAX_PIXELS = 512 * 512, 1024 * 1024  # the released preprocessor_config.json
MAX_ASPECT_RATIO = 5.0  # the original processor's limit (transformers' port allows 200)


def smart_resize(height: int, width: int, factor: int = 8, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """The released rule: round each side to a multiple of `factor`; if the area leaves [min_pixels, max_pixels],
    rescale both sides by one factor (rounding down when shrinking, up when growing) to get back inside.
    The original processor allows aspect ratios up to MAX_ASPECT_RATIO."""
    if height < factor or width < factor:
        raise ValueError(f"image of {height}x{width} is too small: both sides must be at least {factor} pixels")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(f"image of {height}x{width} has aspect ratio {max(height, width) / min(height, width):.1f}, "
                         f"more than the allowed {max_aspect_ratio}")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python's round, as released
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(path: str | Path) -> Image.Image:
    """Open and decode an image file, or raise a ValueError that names the file."""
    try:
        image = Image.open(path)
        image.load()  # PIL decodes lazily; force it here so a truncated file fails here, with its name
    except Image.DecompressionBombError as e:   # PIL refuses images over 2 x MAX_IMAGE_PIXELS before decoding
        raise ValueError(f"cannot read image file {str(path)!r}: {e} If you trust the file, raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) or shrink the image.") from None
    except (OSError, ValueError) as e:  # covers missing files and PIL.UnidentifiedImageError
        raise ValueError(f"cannot read image file {str(path)!r}: {e}") from e
    return image


def upright_8bit(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it, in an 8-bit mode that PIL's convert("RGB") reads right: the EXIF orientation
    applied (a phone photo stored sideways stands up), and high-bit-depth greyscale scaled, not clipped, to 8 bits:
    16-bit ("I;16*", and "I", which is how PIL opens 16-bit PNGs and TIFFs) by its high byte, as PIL itself reads
    16-bit colour PNGs; 32-bit float ("F") taken as 0..1. Values outside those ranges are refused, not clipped."""
    if image.getexif().get(0x0112, 1) != 1:   # 0x0112: the Orientation tag; 1 = stored upright
        image = ImageOps.exif_transpose(image)
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image)
    if image.mode == "F":   # a float image states no range; 0..1 is numpy's and torchvision's convention
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"an F-mode image (32-bit float) with values in [{values.min()}, {values.max()}]: "
                             f"nano_emu reads float images as 0..1; save it as an 8- or 16-bit image")
        eight = np.rint(values * 255)
    else:
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"an {image.mode}-mode image with values in [{values.min()}, {values.max()}]: nano_emu "
                             f"reads integer greyscale as 16-bit (0..65535); save it as an 8- or 16-bit image")
        eight = values.astype(np.int64) >> 8   # 65535 -> 255, 32768 -> 128: PIL's rule for 16-bit colour PNGs
    return Image.fromarray(eight.astype(np.uint8), "L")


def flatten_alpha(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An image with transparency blended onto a solid background in float64, (1 - a) * background + a * rgb with
    a = alpha / 255, truncated to uint8; an image without any pixel less than opaque is PIL's plain convert("RGB").
    Palette and greyscale images with transparency ("P", "PA", "LA") go through RGBA first."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0                                       # (H, W, 1) float64
    blended = (1 - alpha) * np.asarray(background, dtype=np.float64) + alpha * rgba[:, :, :3]   # (H, W, 3)
    return Image.fromarray(blended.astype(np.uint8), "RGB")             # astype truncates


def whiten_transparency(image: Image.Image) -> Image.Image:
    """Chameleon's reference (`ImageTokenizer._whiten_transparency` in chameleon/inference/image_tokenizer.py):
    transparency blended onto white in float64 and truncated (flatten_alpha). PIL's alpha_composite rounds
    instead, which moves a half-transparent pixel by one level and with it some of the VQ's codes."""
    return flatten_alpha(image, (255, 255, 255))


def load_clip(path: str | Path) -> list[Image.Image]:
    """The frames of a clip: an animated GIF, or a folder of image files in name order (frame_00.png, ...).
    A GIF writer stores a run of identical frames once, with the run's total duration (PIL does), so a GIF frame
    held for k times the shortest frame's duration counts as k frames: the clip keeps its length."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"no frames in folder {str(path)!r}")
        return [load_image(p) for p in files]
    image = load_image(path)
    frames, durations = [], []
    for k in range(getattr(image, "n_frames", 1)):
        image.seek(k)
        # a GIF frame is a palette image that may reuse the previous one; a TIFF page may be 16-bit
        frames.append(upright_8bit(image).convert("RGB"))
        durations.append(image.info.get("duration") or 0)
    shortest = min((d for d in durations if d > 0), default=0)
    repeats = [max(1, round(d / shortest)) if shortest else 1 for d in durations]
    return [frame for frame, n in zip(frames, repeats) for _ in range(n)]


def square_crop(image: Image.Image, side: int) -> Image.Image:
    """Chameleon's preprocessing (chameleon/inference/image_tokenizer.py): transparency blended onto white as the
    reference does (whiten_transparency), the shortest side resized to `side` (LANCZOS), then the centre
    side x side square."""
    image = whiten_transparency(image)
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1], the VQ's input convention."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return x.movedim(-1, -3)  # (..., 3, H, W)


def from_tensor(x: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3); values outside [-1, 1] are clipped."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


def image_to_tensor(image: Image.Image | str | Path, factor: int = 8, min_pixels: int = MIN_PIXELS,
                    max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO,
                    square: int | None = None) -> Tensor:
    """A PIL image (any mode: RGBA, L, P, ...) or a path -> float32 pixels (3, H, W) in [-1, 1], smart-resized;
    or, with `square` (Chameleon), square_crop'ed to square x square."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = upright_8bit(image)
    if square is not None:
        image = square_crop(image, square)
    # the released processor uses PIL's plain convert (transformers 4.44): alpha is dropped, not composited on white
    image = image.convert("RGB")
    h, w = (square, square) if square is not None else smart_resize(image.height, image.width, factor, min_pixels,
                                                                     max_pixels, max_aspect_ratio)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W) in [0, 255]
    return (pixels / 255.0 - 0.5) / 0.5  # rescale 1/255, then normalise with mean = std = 0.5, as released


def tensor_to_image(pixels: Tensor) -> Image.Image:
    """Pixels (3, H, W) in [-1, 1] -> RGB PIL image. Like the released postprocess, values are clipped and truncated
    (not rounded) to uint8."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected pixels of shape (3, H, W), got {tuple(pixels.shape)}")
    x = ((pixels.detach().float().cpu() * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())  # (H, W, 3)


def save_image(image: Image.Image, path: str | Path, **params) -> None:
    """image.save(path, **params), atomically: written to `<name>.tmp` beside it and renamed over it, so a full disk
    or a kill mid-write leaves the previous file (or none), never a torn or empty one. The suffix names the format.
    An OSError (a full disk, no permission) names the file; the unfinished .tmp is removed."""
    path = Path(path)
    Image.init()
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower()), **params)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        raise
