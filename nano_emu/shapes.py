"""Procedural toy worlds and the deterministic checker that scores generated samples.

*shapes*: a 64x64 black canvas holding one filled circle, square or upright triangle in one of six saturated
colours, centred near one of five places, captioned "a red circle in the top left". A few (colour, shape,
position) triples are held out of training to test compositional generalisation, as in CLEVR-CoGenT / the
"compositional" splits of toy text-to-image benchmarks: every held-out triple's three attribute pairs still
occur in training, so only the combination is new.

*moving shapes*: 8 frames of one shape gliding left/right/up/down, captioned "a red circle moving left"; it
exercises the temporal VQ (4 frames -> 1 latent frame) and the end-of-frame markers of the layout.

Everything renders on the fly from an explicit numpy Generator with vectorised masks over a pixel grid (no
anti-aliasing: a crisp world is easier to check). `classify` reads an image back to its attributes by simple
geometry, so text-to-image samples can be scored exactly, without a learned judge (cf. GenEval's detector).
"""
import re
from collections import Counter

import numpy as np

IMAGE_SIZE = 64
VIDEO_FRAMES = 8
COLORS = {  # pure primaries and secondaries: every channel is 0 or 255, so hues are far apart
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (x, y) centre in pixels; the corners sit at the quarter points
    "top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
    "center": (32, 32),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y points down
SIZES = (8, 9, 10, 11, 12)  # half-extent: every shape fills a 2*size x 2*size box
JITTER = 3  # max integer shift of the centre, pixels; 16 - 3 - 12 >= 0 keeps corner shapes on the canvas
SPEEDS = (2, 3, 4)  # pixels per frame for moving shapes: 7 steps travel 14..28 pixels

# One held-out triple per colour, no two sharing a (colour, shape), (colour, position) or (shape, position)
# pair, so removing them leaves every pair with at least 2 training triples (tests check the coverage).
HELDOUT = (
    ("red", "triangle", "center"), ("green", "circle", "top right"), ("blue", "square", "bottom left"),
    ("yellow", "triangle", "top left"), ("cyan", "square", "bottom right"), ("magenta", "circle", "center"),
)
ALL_TRIPLES = tuple((c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if t not in HELDOUT)
_SPLITS = {"train": TRAIN_TRIPLES, "heldout": HELDOUT, "all": ALL_TRIPLES}

# -----------------------------------------------------------------------------
# captions


def _alt(names) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


_CAPTION_RE = re.compile(f"a {_alt(COLORS)} {_alt(SHAPES)} in the {_alt(POSITIONS)}")
_VIDEO_CAPTION_RE = re.compile(f"a {_alt(COLORS)} {_alt(SHAPES)} moving {_alt(DIRECTIONS)}")


def caption(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} in the {position}"


def video_caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def vocabulary() -> list[str]:
    """Every word the captions of both worlds use, then what layout.py's meta text needs ("8*8", "2*8*8"): the
    whole vocabulary of a tokenizer.WordTokenizer for this language, in a fixed order."""
    words = ["a", "in", "the", "moving", *COLORS, *SHAPES, *DIRECTIONS]
    for position in POSITIONS:
        words += [w for w in position.split() if w not in words]
    return words + [str(d) for d in range(10)] + ["*"]


def parse_caption(text: str) -> tuple[str, str, str] | None:
    m = _CAPTION_RE.fullmatch(text.strip())
    return m.groups() if m else None


def parse_video_caption(text: str) -> tuple[str, str, str] | None:
    m = _VIDEO_CAPTION_RE.fullmatch(text.strip())
    return m.groups() if m else None


# -----------------------------------------------------------------------------
# rendering

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array(list(COLORS.values()), dtype=np.uint8)  # (6, 3), row i is _COLOR_NAMES[i]
# Pixel centres sit at i + 0.5; doubling every coordinate keeps all the mask arithmetic in exact integers.
_X2 = (2 * np.arange(IMAGE_SIZE) + 1).astype(np.int32)


def _shape_masks(shape_id: int, cx: np.ndarray, cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Boolean (n, H, W) masks of one shape kind centred at integer (cx, cy) with half-extent size."""
    dx = _X2[None, None, :] - 2 * cx[:, None, None]  # (n, 1, W), odd integers
    dy = _X2[None, :, None] - 2 * cy[:, None, None]  # (n, H, 1)
    s2 = 2 * size[:, None, None]
    if SHAPES[shape_id] == "circle":
        return dx * dx + dy * dy < s2 * s2
    if SHAPES[shape_id] == "square":
        return (np.abs(dx) < s2) & (np.abs(dy) < s2)
    # upright isosceles triangle, apex at the top of the box, base = full box width, so its bbox is the same
    # 2s x 2s square as the others and its fill ratio is ~1/2. `depth` is (doubled) distance below the apex;
    # the +1 gives the apex row 2 pixels instead of leaving it empty.
    depth = dy + s2
    return (depth > 0) & (depth < 2 * s2) & (2 * np.abs(dx) <= depth + 1)


def _draw(color_id, shape_id, cx, cy, size) -> np.ndarray:
    """Render integer attribute arrays (broadcast to one batch shape) to uint8 images (*batch, H, W, 3)."""
    arrays = np.broadcast_arrays(color_id, shape_id, cx, cy, size)
    batch = arrays[0].shape
    color_id, shape_id, cx, cy, size = (a.ravel() for a in arrays)
    n = len(color_id)
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    # chunks bound the int32 temporaries (~16 MB each) whatever n is
    for start in range(0, n, 1024):
        sl = slice(start, start + 1024)
        for k in range(len(SHAPES)):
            idx = np.flatnonzero(shape_id[sl] == k) + start
            if len(idx):
                mask[idx] = _shape_masks(k, cx[idx], cy[idx], size[idx])
    # one channel at a time: a broadcast (n, H, W, 1) * (n, 1, 1, 3) multiply is slower
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for c in range(3):
        np.multiply(mask.view(np.uint8), _PALETTE[color_id, c][:, None, None], out=images[..., c])
    return images.reshape(*batch, IMAGE_SIZE, IMAGE_SIZE, 3)


def render(color: str, shape: str, position: str, size: int = 10, dx: int = 0, dy: int = 0) -> np.ndarray:
    """One shapes image, (64, 64, 3) uint8, centred at POSITIONS[position] + (dx, dy)."""
    x, y = POSITIONS[position]
    return _draw(_COLOR_NAMES.index(color), SHAPES.index(shape), x + dx, y + dy, size)


def render_video(color: str, shape: str, direction: str, size: int, x: int, y: int,
                 speed: int) -> np.ndarray:
    """One moving-shapes clip, (8, 64, 64, 3) uint8, starting centred at (x, y), `speed` pixels per frame."""
    ux, uy = DIRECTIONS[direction]
    t = np.arange(VIDEO_FRAMES)
    return _draw(_COLOR_NAMES.index(color), SHAPES.index(shape), x + ux * speed * t, y + uy * speed * t, size)


def sample_shapes(n: int, rng: np.random.Generator | int, split: str = "train"
                  ) -> tuple[np.ndarray, list[str], list[tuple[str, str, str]]]:
    """n random shapes images (n, 64, 64, 3) uint8 with captions and (color, shape, position) triples.
    split: "train" never draws a HELDOUT triple, "heldout" draws only those, "all" draws from everything."""
    rng = np.random.default_rng(rng)  # passes a Generator through, seeds a new one from an int
    triples = _SPLITS[split]
    attrs = [triples[i] for i in rng.integers(len(triples), size=n)]
    color_id = np.array([_COLOR_NAMES.index(c) for c, _, _ in attrs], dtype=np.int64)
    shape_id = np.array([SHAPES.index(s) for _, s, _ in attrs], dtype=np.int64)
    centre = np.array([POSITIONS[p] for _, _, p in attrs], dtype=np.int64).reshape(n, 2)
    size = rng.choice(SIZES, size=n)
    jitter = rng.integers(-JITTER, JITTER + 1, size=(n, 2))
    images = _draw(color_id, shape_id, centre[:, 0] + jitter[:, 0], centre[:, 1] + jitter[:, 1], size)
    return images, [caption(*a) for a in attrs], attrs


def sample_moving_shapes(n: int, rng: np.random.Generator | int
                         ) -> tuple[np.ndarray, list[str], list[tuple[str, str, str]]]:
    """n random clips (n, 8, 64, 64, 3) uint8 with captions and (color, shape, direction) triples.
    The start is drawn so that the whole shape stays on the canvas in every frame."""
    rng = np.random.default_rng(rng)
    color_id = rng.integers(len(COLORS), size=n)
    shape_id = rng.integers(len(SHAPES), size=n)
    dir_id = rng.integers(len(DIRECTIONS), size=n)
    size = rng.choice(SIZES, size=n)
    speed = rng.choice(SPEEDS, size=n)
    unit = np.array(list(DIRECTIONS.values()))[dir_id]  # (n, 2)
    travel = unit * (speed * (VIDEO_FRAMES - 1))[:, None]  # (n, 2) signed displacement first -> last frame
    # a centre c keeps the shape inside when size <= c <= 64 - size, at both ends of the track
    lo = size[:, None] + np.maximum(0, -travel)
    hi = IMAGE_SIZE - size[:, None] - np.maximum(0, travel)
    start = rng.integers(lo, hi + 1)  # (n, 2)
    t = np.arange(VIDEO_FRAMES)
    centres = start[:, None, :] + unit[:, None, :] * speed[:, None, None] * t[None, :, None]  # (n, T, 2)
    # per-clip attributes as (n, 1) broadcast against the (n, T) centres
    videos = _draw(color_id[:, None], shape_id[:, None], centres[..., 0], centres[..., 1], size[:, None])
    directions = list(DIRECTIONS)
    attrs = [(_COLOR_NAMES[c], SHAPES[s], directions[d]) for c, s, d in zip(color_id, shape_id, dir_id)]
    return videos, [video_caption(*a) for a in attrs], attrs


# -----------------------------------------------------------------------------
# checker

_MIN_BRIGHTNESS = 64  # below this nothing counts as foreground, whatever the image's own peak
_MIN_AREA = 20  # pixels; the smallest clean triangle has 144
_MAX_AREA = 2 * (2 * max(SIZES)) ** 2  # twice the largest square
_MIN_IOU = 0.7
_GRID = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE][::-1] + 0.5  # (2, H, W): x, y of every pixel centre


def _foreground(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the pixels bright enough to belong to a shape."""
    brightness = image.max(axis=-1).astype(np.float32)
    # half the peak is where a blurred edge crosses over, so the blob keeps its true extent under blur;
    # the floor stops noise on a black image from being called a shape
    return brightness > max(_MIN_BRIGHTNESS, 0.5 * brightness.max())


def _components(mask: np.ndarray) -> np.ndarray:
    """Integer (H, W) labels of the 8-connected regions of a boolean mask: 0 off the mask, one id per region."""
    # connected components without scipy: every pixel starts with its own id and repeatedly takes the largest
    # label in its 3x3 neighbourhood (8-connectivity), then "pointer-jumps" to the label of the pixel that
    # label names (same component, label at least as large), so labels spread in ~5 steps instead of ~30
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()  # 3x3 max, separably: rows then columns
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        rows = grown.copy()
        grown[:, 1:] = np.maximum(grown[:, 1:], rows[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], rows[:, 1:])
        grown = np.where(mask, grown, 0)
        grown = np.where(mask, grown.ravel()[grown - 1], 0)  # the jump; background's -1 is masked out
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _largest_blob(image: np.ndarray) -> np.ndarray | None:
    """Boolean (H, W) mask of the largest 8-connected bright region, or None if there is none."""
    mask = _foreground(image)
    if mask.sum() < _MIN_AREA:
        return None
    labels = _components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    blob = labels == ids[counts.argmax()]
    return blob if counts.max() >= _MIN_AREA else None


def _centroid(blob: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(blob)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # (x, y) in pixel-centre coordinates


def _read_color(image: np.ndarray, blob: np.ndarray) -> str:
    """The palette colour of the pixels under a blob (H, W) of an image (H, W, 3)."""
    # divide each pixel by its brightest channel, so dim blurred edges read as the same hue, then take the
    # per-channel median so a few noisy pixels cannot move it
    rgb = image[blob].astype(np.float32)  # (area, 3)
    chroma = np.median(rgb / rgb.max(axis=1, keepdims=True), axis=0) * 255
    return _COLOR_NAMES[np.argmin(((_PALETTE - chroma) ** 2).sum(axis=1))]


def _read_shape(blob: np.ndarray, grid: np.ndarray = _GRID) -> tuple[str, float]:
    """The shape a blob (H, W) looks most like, and its IoU with that shape; grid is (2, H, W) pixel centres."""
    # which ideal shape of the blob's own area, placed on its centroid, overlaps it best (IoU). Unlike a
    # bounding-box fill ratio this barely moves when noise adds a bump or blur rounds a corner.
    area, (cx, cy) = blob.sum(), _centroid(blob)
    u, v = grid[0] - cx, grid[1] - cy  # (H, W) offsets of pixel centres from the centroid
    side = np.sqrt(2 * area)  # the triangle's base and height: area = side^2 / 2
    depth = v + 2 * side / 3  # below the apex; a triangle's centroid is 2/3 of the way down
    templates = {
        "circle": u * u + v * v < area / np.pi,
        "square": np.maximum(np.abs(u), np.abs(v)) < np.sqrt(area) / 2,
        "triangle": (depth > 0) & (depth < side) & (np.abs(u) < depth / 2),
    }
    iou = {name: (blob & t).sum() / (blob | t).sum() for name, t in templates.items()}
    shape = max(iou, key=iou.get)
    return shape, iou[shape]


# how much of its bounding box a crisp shape fills: a rendered square 1, a circle ~pi/4, a triangle ~1/2. The
# checker's IoU forgives a rounded corner; this does not, so it tells a crisp square from a lumpy one.
FILL_RANGES = {"square": (0.92, 1.0), "circle": (0.72, 0.84), "triangle": (0.45, 0.60)}


def fill(image: np.ndarray) -> float | None:
    """The fraction of its bounding box the largest shape of an image (64, 64, 3) fills, or None without one."""
    blob = _largest_blob(image)
    if blob is None:
        return None
    ys, xs = np.nonzero(blob)
    return float(blob.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


def fill_in_range(images: np.ndarray, shapes: list[str]) -> dict[str, float]:
    """Per shape, the share of images (n, 64, 64, 3) meant to show it whose fill lies in FILL_RANGES[shape]
    ("<shape>_fill"; an image without a shape counts as outside)."""
    result = {}
    for name, (low, high) in FILL_RANGES.items():
        fills = [fill(x) for x, s in zip(images, shapes, strict=True) if s == name]
        if fills:
            result[f"{name}_fill"] = float(np.mean([f is not None and low <= f <= high for f in fills]))
    return result


def classify(image: np.ndarray) -> tuple[str, str, str] | None:
    """Read a shapes image (64, 64, 3) uint8 back to (color, shape, position), or None if it has no shape."""
    blob = _largest_blob(image)
    if blob is None:
        return None
    color = _read_color(image, blob)
    shape, iou = _read_shape(blob)
    area, (cx, cy) = blob.sum(), _centroid(blob)
    # a blob no ideal shape explains (two shapes run together, a smear) or far bigger than any shape in this
    # world (a canvas of noise matches a huge "square") is unreadable rather than a lucky guess. Renders
    # through 5x5 blur + noise, JPEG q20 or 4x pool-and-upsample keep IoU > 0.82; two squares overlapping by a
    # third of their width score < 0.6 (heavily overlapping pairs can pass: they look like one blob).
    if iou < _MIN_IOU or area > _MAX_AREA:
        return None
    # position: nearest centre to the centroid. A triangle's centroid sits size/3 <= 4 px below its box
    # centre; with jitter <= 3 that stays > 4 px inside the right cell of the nearest-centre partition.
    centres = np.array(list(POSITIONS.values()), dtype=np.float32)
    position = list(POSITIONS)[np.argmin(((centres - (cx, cy)) ** 2).sum(axis=1))]
    return color, shape, position


def classify_motion(video: np.ndarray) -> str | None:
    """Direction of motion of a clip (T, 64, 64, 3) from the least-squares slope of its centroid track."""
    track = [(t, _centroid(b)) for t, b in enumerate(map(_largest_blob, video)) if b is not None]
    if len(track) < 2:
        return None
    t = np.array([t for t, _ in track], dtype=np.float32)
    xy = np.stack([c for _, c in track])  # (frames, 2)
    velocity = np.polyfit(t, xy, 1)[0]  # (2,) pixels per frame
    if np.abs(velocity).max() < 0.5:  # the slowest clip moves 2 px/frame; anything much slower is "still"
        return None
    axis = np.abs(velocity).argmax()
    unit = tuple(int(v) for v in np.eye(2, dtype=int)[axis] * np.sign(velocity[axis]))
    return {u: d for d, u in DIRECTIONS.items()}[unit]


def classify_video(video: np.ndarray) -> tuple[str, str, str] | None:
    """Read a clip (T, 64, 64, 3) back to (color, shape, direction): colour and shape by majority over frames."""
    reads = [r for r in map(classify, video) if r is not None]
    direction = classify_motion(video)
    if not reads or direction is None:
        return None
    # Counter breaks ties by first appearance, so the read is deterministic (a set's order is not)
    color = Counter(r[0] for r in reads).most_common(1)[0][0]
    shape = Counter(r[1] for r in reads).most_common(1)[0][0]
    return color, shape, direction


def score(images: np.ndarray, attrs: list[tuple[str, str, str]]) -> dict[str, float]:
    """Fraction of samples read back correctly: "all" three attributes, each one alone, and "unreadable".
    images (n, 64, 64, 3) are scored as shapes (color, shape, position); clips (n, T, 64, 64, 3) as moving
    shapes (color, shape, direction)."""
    video = images.ndim == 5
    reads = [(classify_video if video else classify)(x) for x in images]
    keys = ("color", "shape", "direction" if video else "position")
    hits = np.array([[r is not None and r[i] == a[i] for i in range(3)] for r, a in zip(reads, attrs)])
    hits = hits.reshape(len(attrs), 3)
    result = {"all": float(hits.all(axis=1).mean())}
    result.update({k: float(hits[:, i].mean()) for i, k in enumerate(keys)})
    result["unreadable"] = sum(r is None for r in reads) / max(len(reads), 1)
    return result
