"""Tests for the toy worlds (nano_emu/shapes.py): captions, splits, rendering and the checker that scores samples."""
import itertools
import re

import numpy as np
import pytest
import torch

from nano_emu import shapes
from nano_emu.image import from_tensor, to_tensor
from nano_emu.shapes import (ALL_TRIPLES, COLORS, DIRECTIONS, HELDOUT, IMAGE_SIZE, JITTER, POSITIONS, SHAPES,
                             SIZES, TRAIN_TRIPLES, VIDEO_FRAMES)

# written out literally, not taken from shapes.py, so a change to the caption format fails here
CAPTION_RE = re.compile(r"a (red|green|blue|yellow|cyan|magenta) (circle|square|triangle) "
                        r"in the (top left|top right|bottom left|bottom right|center)")
VIDEO_CAPTION_RE = re.compile(r"a (red|green|blue|yellow|cyan|magenta) (circle|square|triangle) "
                              r"moving (left|right|up|down)")


def box_blur3(images: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge padding, roughly what a small VQ decoder does to a crisp edge."""
    padded = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(padded[:, i:i + IMAGE_SIZE, j:j + IMAGE_SIZE] for i in range(3) for j in range(3)) / 9
    return out.round().astype(np.uint8)


def degrade(images: np.ndarray, rng: np.random.Generator, noise: float, stray: int) -> np.ndarray:
    """Box blur, Gaussian noise on every channel, and `stray` random pixels set to random palette colours."""
    out = box_blur3(images).astype(np.float32) + rng.normal(0, noise, images.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    palette = np.array(list(COLORS.values()), dtype=np.uint8)
    for image in out:
        ys, xs = rng.integers(IMAGE_SIZE, size=(2, stray))
        image[ys, xs] = palette[rng.integers(len(palette), size=stray)]
    return out


# -----------------------------------------------------------------------------
# world definition


def test_the_world_fits_its_canvas_and_its_palette_reads_back():
    """Every shape at its largest size and furthest jitter stays on the canvas, every clip stays on it in every
    frame, and the palette's colours are pure, distinct and not white (the checker's hue rule relies on it)."""
    assert all(set(rgb) <= {0, 255} and 0 < sum(rgb) < 3 * 255 for rgb in COLORS.values())
    assert len(set(COLORS.values())) == len(COLORS)
    for x, y in POSITIONS.values():
        assert max(SIZES) + JITTER <= min(x, y) and max(x, y) + JITTER + max(SIZES) <= IMAGE_SIZE
    clips, _, _ = shapes.sample_moving_shapes(200, 0)
    assert clips.shape[1] == VIDEO_FRAMES
    area = (clips.max(-1) > 0).sum((-1, -2))            # (clips, frames): pixels of the shape in each frame
    assert (area == area[:, :1]).all()                  # it moves, it is never cut off by the border
    assert len(ALL_TRIPLES) == len(set(ALL_TRIPLES)) == len(COLORS) * len(SHAPES) * len(POSITIONS)
    assert set(DIRECTIONS) == {shapes.classify_motion(c) for c in clips}


def test_heldout_is_compositional():
    assert len(HELDOUT) > 0 and len(set(HELDOUT)) == len(HELDOUT)
    assert set(HELDOUT) <= set(ALL_TRIPLES)
    assert set(TRAIN_TRIPLES) | set(HELDOUT) == set(ALL_TRIPLES)
    assert not set(TRAIN_TRIPLES) & set(HELDOUT)
    # every attribute value is seen in training ...
    for i, values in enumerate((COLORS, SHAPES, POSITIONS)):
        assert {t[i] for t in TRAIN_TRIPLES} == set(values)
    # ... and so is every pair of attributes of every held-out triple: only the combination is new
    for triple in HELDOUT:
        for i, j in itertools.combinations(range(3), 2):
            assert any(t[i] == triple[i] and t[j] == triple[j] for t in TRAIN_TRIPLES), (triple, i, j)


# -----------------------------------------------------------------------------
# captions


def test_caption_format():
    assert shapes.caption("red", "circle", "top left") == "a red circle in the top left"
    assert shapes.video_caption("blue", "triangle", "up") == "a blue triangle moving up"
    _, captions, attrs = shapes.sample_shapes(300, 0, split="all")
    for text, attr in zip(captions, attrs):
        assert CAPTION_RE.fullmatch(text) and text == "a {} {} in the {}".format(*attr)
    _, captions, attrs = shapes.sample_moving_shapes(50, 0)
    for text, attr in zip(captions, attrs):
        assert VIDEO_CAPTION_RE.fullmatch(text) and text == "a {} {} moving {}".format(*attr)


def test_parse_caption_round_trip():
    for triple in ALL_TRIPLES:
        assert shapes.parse_caption(shapes.caption(*triple)) == triple
    for triple in itertools.product(COLORS, SHAPES, DIRECTIONS):
        assert shapes.parse_video_caption(shapes.video_caption(*triple)) == triple
    for bad in ["", "a red circle", "a purple circle in the top left", "a red circle in the middle",
                "a red circle in the top left please", "a red circle moving left"]:
        assert shapes.parse_caption(bad) is None
    assert shapes.parse_video_caption("a red circle in the top left") is None


# -----------------------------------------------------------------------------
# sampling and rendering


def test_same_seed_same_data():
    a = shapes.sample_shapes(64, 7)
    b = shapes.sample_shapes(64, np.random.default_rng(7))  # an int seed and a Generator agree
    c = shapes.sample_shapes(64, 8)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    va, vb = shapes.sample_moving_shapes(8, 3), shapes.sample_moving_shapes(8, 3)
    assert np.array_equal(va[0], vb[0]) and va[1] == vb[1]
    # a shared Generator advances, so consecutive batches differ
    rng = np.random.default_rng(0)
    assert not np.array_equal(shapes.sample_shapes(16, rng)[0], shapes.sample_shapes(16, rng)[0])


def test_splits():
    _, _, attrs = shapes.sample_shapes(3000, 1, split="train")
    assert not set(attrs) & set(HELDOUT)
    assert set(attrs) == set(TRAIN_TRIPLES)
    _, _, attrs = shapes.sample_shapes(300, 1, split="heldout")
    assert set(attrs) == set(HELDOUT)
    _, _, attrs = shapes.sample_shapes(3000, 1, split="all")
    assert set(attrs) == set(ALL_TRIPLES)
    with pytest.raises(KeyError):
        shapes.sample_shapes(1, 0, split="test")


def test_sample_shapes_images():
    images, captions, attrs = shapes.sample_shapes(500, 2, split="all")
    assert images.shape == (500, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert len(captions) == len(attrs) == 500
    foreground = images.any(axis=-1)  # (n, H, W)
    rgb = np.array([COLORS[color] for color, _, _ in attrs], dtype=np.uint8)[:, None, None, :]
    # black plus exactly the caption's pure colour: no anti-aliasing, no second shape
    assert np.array_equal(images, foreground[..., None] * rgb)
    assert foreground.any(axis=(1, 2)).all()
    border = np.concatenate([foreground[:, 0], foreground[:, -1], foreground[:, :, 0], foreground[:, :, -1]])
    assert not border.any()  # never touches the edge


@pytest.mark.parametrize("shape", SHAPES)
def test_render_geometry(shape):
    # every shape fills a 2*size square box centred on its position plus jitter, and nothing leaves the canvas
    for position, size, dx, dy in itertools.product(POSITIONS, SIZES, (-JITTER, JITTER), (-JITTER, JITTER)):
        image = shapes.render("cyan", shape, position, size, dx, dy)
        mask = image.any(axis=-1)
        ys, xs = np.nonzero(mask)
        x, y = POSITIONS[position]
        assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (
            x + dx - size, x + dx + size, y + dy - size, y + dy + size)
    fill = shapes.render("red", shape, "center", 12).any(axis=-1).sum() / 24 ** 2
    assert fill == pytest.approx({"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[shape], abs=0.06)


def test_triangle_is_upright():
    mask = shapes.render("red", "triangle", "center", 12).any(axis=-1)
    widths = mask.sum(axis=1)[mask.any(axis=1)]
    assert widths[0] < widths[-1] and np.all(np.diff(widths) >= 0)


def test_moving_shapes():
    videos, captions, attrs = shapes.sample_moving_shapes(60, 4)
    assert videos.shape == (60, VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3) and videos.dtype == np.uint8
    assert {a[2] for a in attrs} == set(DIRECTIONS)
    for video, (color, shape, direction) in zip(videos, attrs):
        areas = video.any(axis=-1).sum(axis=(1, 2))
        assert np.all(areas == areas[0]) and areas[0] > 0  # a shape cut by the edge would lose area
        assert shapes.classify_motion(video) == direction
        assert shapes.classify_video(video) == (color, shape, direction)


def test_render_video_moves():
    video = shapes.render_video("green", "square", "down", size=10, x=32, y=12, speed=3)
    ys = [np.nonzero(frame.any(axis=-1))[0].min() for frame in video]
    assert ys == [2 + 3 * t for t in range(VIDEO_FRAMES)]
    assert shapes.classify_motion(video) == "down"
    still = np.stack([shapes.render("red", "circle", "center")] * VIDEO_FRAMES)
    assert shapes.classify_motion(still) is None


def test_tensor_round_trip():
    images, _, _ = shapes.sample_shapes(4, 0)
    x = to_tensor(images)
    assert x.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(from_tensor(x), images)
    videos, _, _ = shapes.sample_moving_shapes(2, 0)
    v = to_tensor(videos)
    assert v.shape == (2, VIDEO_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(from_tensor(v), videos)
    assert from_tensor(torch.full((3, 2, 2), 5.0)).max() == 255  # out of range is clipped, not wrapped


# -----------------------------------------------------------------------------
# checker


def test_classify_clean_every_combination():
    for triple in ALL_TRIPLES:
        for size in (min(SIZES), SIZES[len(SIZES) // 2], max(SIZES)):
            for dx, dy in [(0, 0), (-JITTER, -JITTER), (JITTER, JITTER), (-JITTER, JITTER), (JITTER, -JITTER)]:
                assert shapes.classify(shapes.render(*triple, size, dx, dy)) == triple, (triple, size, dx, dy)


def test_classify_degraded():
    rng = np.random.default_rng(0)
    images, _, attrs = shapes.sample_shapes(400, rng, split="all")
    blurred = shapes.score(box_blur3(images), attrs)
    assert blurred["all"] == 1.0
    noisy = shapes.score(degrade(images, rng, noise=10, stray=5), attrs)
    assert noisy["all"] >= 0.98 and noisy["unreadable"] == 0
    # the VQ path: through [-1, 1] tensors with a little float noise and back
    x = to_tensor(images) + 0.05 * torch.randn(images.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE)
    assert shapes.score(from_tensor(x), attrs)["all"] >= 0.98


def test_classify_unreadable():
    rng = np.random.default_rng(0)
    black = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    assert shapes.classify(black) is None
    dim_noise = np.clip(rng.normal(0, 8, black.shape), 0, 255).astype(np.uint8)
    assert shapes.classify(dim_noise) is None
    assert shapes.classify(rng.integers(0, 256, black.shape, dtype=np.uint8)) is None  # static, not a square
    assert shapes.classify(np.full_like(black, 255)) is None  # one colour everywhere is not a shape
    a, b = shapes.render("red", "square", "top left", 12), shapes.render("red", "square", "center", 12)
    assert shapes.classify(a | b) is None  # two shapes run together
    c = shapes.render("red", "circle", "top left", 12) | shapes.render("red", "circle", "top right", 12, -12)
    assert shapes.classify(c) is None  # two circles touching side by side
    assert shapes.classify_video(np.stack([black] * VIDEO_FRAMES)) is None


def test_score():
    images, _, attrs = shapes.sample_shapes(30, 5, split="all")
    assert shapes.score(images, attrs) == {"all": 1.0, "color": 1.0, "shape": 1.0, "position": 1.0,
                                         "unreadable": 0.0}
    wrong = [("red" if c != "red" else "blue", s, p) for c, s, p in attrs]
    result = shapes.score(images, wrong)
    assert result["all"] == 0.0 and result["color"] == 0.0 and result["shape"] == 1.0
    images[:10] = 0  # a third unreadable
    result = shapes.score(images, attrs)
    assert result["unreadable"] == pytest.approx(1 / 3) and result["all"] == pytest.approx(2 / 3)
    videos, _, vattrs = shapes.sample_moving_shapes(10, 5)
    assert shapes.score(videos, vattrs) == {"all": 1.0, "color": 1.0, "shape": 1.0, "direction": 1.0,
                                          "unreadable": 0.0}


def test_rendered_shapes_fill_their_box_as_geometry_says_and_a_rounded_square_does_not():
    for shape in shapes.SHAPES:
        images = np.stack([shapes.render(c, shape, p, size=s) for c in shapes.COLORS for p in shapes.POSITIONS
                           for s in shapes.SIZES])
        assert shapes.fill_in_range(images, [shape] * len(images)) == {f"{shape}_fill": 1.0}
    square = shapes.render("red", "square", "center", size=10)
    assert shapes.fill(square) == 1.0
    rounded = square.copy()
    ys, xs = np.nonzero(square.any(axis=2))
    for y0, x0 in [(ys.min(), xs.min()), (ys.min(), xs.max() - 3), (ys.max() - 3, xs.min()), (ys.max() - 3, xs.max() - 3)]:
        rounded[y0:y0 + 4, x0:x0 + 4] = 0   # cut 4x4 corners: 64 of 400 pixels
    assert 0.8 < shapes.fill(rounded) < 0.92
    blank = np.zeros_like(square)
    assert shapes.fill(blank) is None
    assert shapes.fill_in_range(np.stack([rounded, blank, square]), ["square"] * 3) == {"square_fill": 1 / 3}


def test_shapes_world_judges_each_drawing_as_it_scores_them():
    from nano_emu.world import Shapes
    world = Shapes()
    images, _, attrs = shapes.sample_shapes(60, np.random.default_rng(2))
    images[::3] = 0   # a third drawn blank
    right = world.judge(images, attrs)
    assert right == [i % 3 != 0 for i in range(60)]
    assert world.score(images, attrs)["adherence"] == pytest.approx(np.mean(right))
    assert {world.category(t) for t in attrs} <= set(shapes.SHAPES)
