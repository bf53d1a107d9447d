"""Reading image files as they really come: 16-bit and float greyscale, alpha in every mode, CMYK, EXIF-rotated
photos, and files over PIL's decompression-bomb limit. Each case states what the pixels must be, worked out by
hand from the file's values, not from nano_emu's code."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from nano_emu.image import image_to_tensor, load_clip, load_image, square_crop, whiten_transparency


def level(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] back to the 0..255 level they came from."""
    return ((x + 1) * 127.5).round()


def png_16bit_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written from the PNG spec: IHDR, one zlib IDAT of
    filter-0 rows of big-endian samples, IEND."""
    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)   # 16 bits, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_16bit_grey_png_is_rescaled_not_clipped(tmp_path):
    """50% grey in 16 bits (32768 of 65535) was read as pure white: PIL's convert("RGB") clips I;16 at 255."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)   # the bug, in PIL itself
    for square in (None, 16):   # Emu3's processing and Chameleon's
        assert torch.all(level(image_to_tensor(path, min_pixels=0, square=square)) == 128)
    # the same grey as a 16-bit colour PNG, which PIL reads by the high byte: both come out at the same level
    (tmp_path / "grey48.png").write_bytes(png_16bit_rgb(np.full((16, 16, 3), 32768, np.uint16)))
    assert torch.all(level(image_to_tensor(tmp_path / "grey48.png", min_pixels=0)) == 128)


@pytest.mark.parametrize("mode, raw, expected", [
    ("I;16", np.array([[0, 257, 32768, 65535]], np.uint16), [0, 1, 128, 255]),
    ("I;16B", np.array([[0, 257, 32768, 65535]], ">u2"), [0, 1, 128, 255]),
    ("I", np.array([[0, 257, 32768, 65535]], np.int32), [0, 1, 128, 255]),        # PIL's mode for 16-bit TIFFs
    ("F", np.array([[0.0, 0.25, 0.5, 1.0]], np.float32), [0, 64, 128, 255]),       # float images are 0..1
])
def test_high_bit_depth_modes(mode, raw, expected):
    image = Image.frombytes(mode, (4, 1), raw.tobytes())
    pixels = image_to_tensor(image.resize((8, 8), Image.NEAREST), min_pixels=0)   # (3, 8, 8): 2 columns a value
    assert level(pixels[0, 0, ::2]).tolist() == expected and torch.equal(pixels[0], pixels[2])


@pytest.mark.parametrize("mode, values, says", [("F", [0.0, 2.5], "float"), ("I", [-3, 70000], "16-bit")])
def test_values_outside_the_modes_range_are_refused(mode, values, says):
    dtype = np.float32 if mode == "F" else np.int32
    image = Image.frombytes(mode, (2, 1), np.array([values], dtype).tobytes()).resize((8, 8))
    with pytest.raises(ValueError, match=rf"{mode}-mode image .*with values in .*{says}"):
        image_to_tensor(image, min_pixels=0)


def reference_whiten(image: Image.Image) -> np.ndarray:
    """Chameleon's _whiten_transparency, restated: (1 - a) * 255 + a * rgb in float64 with a = alpha / 255, in
    that order of operations, then numpy's astype(uint8), which truncates."""
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[:, :, 3] / 255.0
    return ((1 - alpha[:, :, None]) * 255 + alpha[:, :, None] * rgba[:, :, :3]).astype("uint8")


def test_chameleon_blends_transparency_onto_white_as_the_reference():
    """PIL's alpha_composite rounds where the reference truncates: on a 640x480 RGBA image the two differ in
    many pixels (reported to move 44 of a prompt's 1,024 codes with the released VQ); we match the reference."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (480, 640, 4), dtype=np.uint8), "RGBA")
    ours = np.asarray(whiten_transparency(rgba))
    assert np.array_equal(ours, reference_whiten(rgba))
    pil = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    assert (pil != ours).any(axis=2).mean() > 0.1   # the old path: a different image
    # the whole preprocessing then works on the reference's pixels
    assert np.array_equal(np.asarray(square_crop(rgba, 32)), np.asarray(square_crop(Image.fromarray(ours), 32)))


@pytest.mark.parametrize("mode", ["LA", "PA", "P"])
def test_alpha_in_other_modes(mode):
    """A grey (100) pixel at alpha 0 and at 255: Emu3's released processor drops alpha (plain convert), Chameleon's
    blends onto white. P carries its alpha as a transparent palette index."""
    if mode == "P":
        image = Image.new("P", (2, 1))
        image.putpalette([100, 100, 100] * 256)
        image.putpixel((0, 0), 1)
        image.info["transparency"] = 1   # index 1 is fully transparent; index 0 (pixel 1) is opaque
    else:
        image = Image.new("RGBA", (2, 1))
        image.putdata([(100, 100, 100, 0), (100, 100, 100, 255)])
        image = image.convert(mode)   # (LA -> PA would drop the alpha: a PIL quirk, so both start from RGBA)
        assert image.mode == mode and image.convert("RGBA").getpixel((0, 0))[3] == 0
    image = image.resize((8, 8), Image.NEAREST)
    emu3 = level(image_to_tensor(image, min_pixels=0))
    chameleon = level(image_to_tensor(image, square=8))
    assert emu3[:, 0, 0].tolist() == [100] * 3 and emu3[:, 0, 7].tolist() == [100] * 3
    assert chameleon[:, 0, 0].tolist() == [255] * 3 and chameleon[:, 0, 7].tolist() == [100] * 3


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    for square in (None, 16):
        pixels = level(image_to_tensor(path, min_pixels=0, square=square))
        assert (pixels[:, 8, 8] - torch.tensor([200.0, 30, 30])).abs().max() <= 6   # JPEG's loss, not a colour swap


def test_exif_rotated_jpeg_stands_up(tmp_path):
    """A phone photo stored 32 wide x 16 tall, left half black, with Orientation 6 (show it turned 90 degrees
    clockwise): a viewer shows it 16 wide x 32 tall with the black half on top, and so do we."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    pixels = level(image_to_tensor(path, min_pixels=0, max_aspect_ratio=5))
    assert pixels.shape == (3, 32, 16)
    assert pixels[:, :12].mean() < 20 and pixels[:, 20:].mean() > 235
    assert load_clip(path)[0].size == (16, 32)   # clips (frames read one by one) stand up too


def test_an_image_over_pils_bomb_limit_is_one_clear_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 4096 pixels > 2 x 1000: PIL refuses to decode it
    with pytest.raises(ValueError, match=r"cannot read image file .*huge.png.*decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(SystemExit) as exit:
        sample.parse_args(["--ckpt", str(ckpt), "--caption", str(path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "decompression bomb" in err, err
