"""*scenes*: a toy world where the words matter, scored like GenEval by an exact checker, with questions.

1-4 filled circles, squares or upright triangles on black, in shapes.py's six pure colours and exact masks, each
"small" or "large", never touching. A small grammar captions a scene in one of GenEval's six categories (Ghosh et
al. 2023), and the checker scores a picture per category as GenEval does, by geometry instead of a detector:

    single_object  "a circle", "a large square"          colors      "a red circle", "a small blue triangle"
    two_object     "a circle and a small square"         color_attr  "a red circle and a large green square"
    counting       "three triangles", "two blue squares" position    "a large cyan triangle above a magenta circle"

Captions are complete: every object drawn is named, and what a caption leaves out is drawn at random. "A left of
B" compares centroids: B - A must point along the relation's axis by at least |across| + REL_MARGIN px, so the four
relations are exclusive cones; position scenes are drawn deep inside theirs, so VQ error cannot flip them. Scoring
tolerates extra objects except in counting, as GenEval; score(strict=True) also wants nothing else. Sizes are set
for the tiny VQ's 8 px codes: small (half-extent 7-8 px) and large (11-12 px) stay apart through blur, noise and
pooling (tests), GAP and BORDER keep neighbours apart and still fit four large objects.

Held out, by what a picture shows (so no question can leak it): exactly three triangles or four circles
(HELDOUT_COUNTS), both objects of a pair such as a red circle with a blue square (HELDOUT_BINDINGS; the swap is
seen), a triangle above a circle or a square left of a triangle, even loosely (HELDOUT_RELATIONS). Every part of
each is seen in training; the "heldout" split holds the prompts that name one.

describe() captions a picture with the grammar's most specific true and complete caption (one right answer);
questions() asks what the picture answers uniquely ("how many circles?", "what is left of the green square?").
Grammar, sampler, checker and questions read one geometry (sprites, centroids, relation cones, held-out rules), so
they share this module, in that order.
"""
import itertools
from functools import cache
from typing import NamedTuple

import numpy as np

from . import shapes
from .shapes import COLORS, SHAPES

CANVAS = 64
SIZE_HALVES = {"small": (7, 8), "large": (11, 12)}  # size word -> the half-extents it may be drawn with
GAP, BORDER = 4, 2  # px of black between two objects' boxes, and between a box and the canvas edge
REL_MARGIN = 4  # px; see the docstring's relation rule
MAX_OBJECTS = 4
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's tags
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four")
PLURALS = {shape: shape + "s" for shape in SHAPES}

HELDOUT_COUNTS = ((3, "triangle"), (4, "circle"))
HELDOUT_BINDINGS = ((("red", "circle"), ("blue", "square")), (("green", "triangle"), ("yellow", "circle")),
                    (("cyan", "square"), ("magenta", "triangle")))
HELDOUT_RELATIONS = (("triangle", "above", "circle"), ("square", "left of", "triangle"))
SPLITS = ("train", "heldout", "all")


class Thing(NamedTuple):
    """What a caption says about one object; None where it says nothing (any value fits)."""
    shape: str
    color: str | None = None
    size: str | None = None


class Prompt(NamedTuple):
    """A parsed caption: its GenEval category, the things it names, how many (counting) and their relation."""
    category: str
    things: tuple[Thing, ...]
    count: int = 1
    relation: str | None = None  # position: things[0] <relation> things[1]


class Obj(NamedTuple):
    """An object in a picture: what the checker reads back. (x, y) is its centroid in pixels."""
    color: str
    shape: str
    size: str
    x: float
    y: float


class Scene(NamedTuple):
    prompt: Prompt | None  # None for a hand-placed scene
    objects: tuple[Obj, ...]
    boxes: tuple[tuple[int, int, int], ...]  # (cx, cy, half) per object: its integer 2half x 2half box


# -----------------------------------------------------------------------------
# the grammar: the language is finite (~14,000 captions), so it is enumerated once and parsed by lookup


def _phrase(thing: Thing) -> str:
    return " ".join(w for w in ("a", thing.size, thing.color, thing.shape) if w)


def caption(prompt: Prompt) -> str:
    if prompt.category == "counting":
        thing = prompt.things[0]
        return " ".join(w for w in (NUMBERS[prompt.count], thing.color, PLURALS[thing.shape]) if w)
    if len(prompt.things) == 1:
        return _phrase(prompt.things[0])
    link = "and" if prompt.relation is None else prompt.relation
    return f"{_phrase(prompt.things[0])} {link} {_phrase(prompt.things[1])}"


def describe(objects) -> str:
    """A picture's one caption (image -> text): the grammar's most specific true and complete caption of these
    objects, left one first: "a small red circle and a large blue square", "three red triangles", "three triangles"."""
    objects = sorted(objects, key=lambda o: (o.x, o.y))
    kinds = {(o.color, o.shape) for o in objects}
    if len(objects) == 1 or (len(objects) == 2 and len(kinds) == 2):
        return caption(Prompt("colors" if len(objects) == 1 else "color_attr",
                              tuple(Thing(o.shape, o.color, o.size) for o in objects)))
    if len({o.shape for o in objects}) == 1 and len(objects) <= MAX_OBJECTS:
        color = objects[0].color if len(kinds) == 1 else None
        return caption(Prompt("counting", (Thing(objects[0].shape, color),), len(objects)))
    raise ValueError(f"no caption of the grammar describes {len(objects)} objects of different shapes: {objects}")


@cache
def _grammar() -> dict[str, Prompt]:
    sizes = (None, *SIZE_HALVES)  # every "a ..." phrase may name a size, or not
    pairs = list(itertools.product(COLORS, SHAPES))  # (colour, shape)
    prompts = [Prompt("single_object", (Thing(s, None, z),)) for s in SHAPES for z in sizes]
    prompts += [Prompt("colors", (Thing(s, c, z),)) for c, s in pairs for z in sizes]
    prompts += [Prompt("counting", (Thing(s, c),), n) for n in (2, 3, 4) for c in (None, *COLORS) for s in SHAPES]
    for z1, z2 in itertools.product(sizes, sizes):
        prompts += [Prompt("two_object", (Thing(s1, None, z1), Thing(s2, None, z2)))
                    for s1, s2 in itertools.permutations(SHAPES, 2)]
        for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2):
            things = (Thing(s1, c1, z1), Thing(s2, c2, z2))
            prompts += [Prompt("color_attr", things)] + [Prompt("position", things, 1, r) for r in RELATIONS]
    return {caption(p): p for p in prompts}


def parse(text: str) -> Prompt | None:
    """The prompt a caption says, or None for any text the grammar cannot produce."""
    return _grammar().get(" ".join(text.split()))


def _as_prompt(prompt: Prompt | str) -> Prompt:
    parsed = parse(caption(prompt) if isinstance(prompt, Prompt) else prompt)
    if parsed is None or (isinstance(prompt, Prompt) and parsed != prompt):
        raise ValueError(f"{prompt!r} is not a caption of the scenes world (e.g. 'a red circle left of a blue "
                         f"square'; see nano_emu/scenes.py)")
    return parsed


def _fact(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """(a, relation, b) with "below" and "right of" turned round, so one spatial fact has one spelling."""
    flip = {"below": "above", "right of": "left of"}
    return (b, flip[relation], a) if relation in flip else (a, relation, b)


def names_heldout(prompt: Prompt | str) -> bool:
    """Whether a prompt names a held-out composition (then it is in the "heldout" split, never in "train")."""
    p = _as_prompt(prompt)
    if p.category == "counting":
        return (p.count, p.things[0].shape) in HELDOUT_COUNTS
    if p.category in ("color_attr", "position"):
        pair = {(t.color, t.shape) for t in p.things}
        if any(pair == set(b) for b in HELDOUT_BINDINGS):
            return True
    return p.relation is not None and _fact(p.things[0].shape, p.relation, p.things[1].shape) in HELDOUT_RELATIONS


@cache
def prompts(split: str = "train", category: str | None = None) -> tuple[Prompt, ...]:
    """Every prompt of a split ("train": names nothing held out, "heldout": names something, "all"), optionally
    of one category, in a fixed order."""
    if split not in SPLITS or category not in (None, *CATEGORIES):
        raise ValueError(f"split must be one of {SPLITS} and category None or one of {CATEGORIES}, "
                         f"got {split!r}, {category!r}")
    return tuple(p for p in _grammar().values() if (category is None or p.category == category)
                 and (split == "all" or names_heldout(p) == (split == "heldout")))


def vocabulary() -> list[str]:
    """Every word of captions, questions and answers, then the digits and "*" of layout.py's "8*8", in a fixed order."""
    texts = ["a and", *COLORS, *SHAPES, *PLURALS.values(), *SIZE_HALVES, *NUMBERS, *RELATIONS,
             "how many what colour shape size is the object there yes no ?"]
    words = list(dict.fromkeys(w for text in texts for w in text.split()))
    return words + [str(d) for d in range(10)] + ["*"]


# -----------------------------------------------------------------------------
# geometry shared by the sampler, the checker and the questions

# sprites: every shape at every half-extent, cut from shapes.py's exact masks (drawn centred on its 64 px canvas);
# an integer shift moves such a mask exactly, so a scene is its sprites pasted at integer box corners
_HALVES = sorted(h for halves in SIZE_HALVES.values() for h in halves)
_SPRITES = {(s, h): shapes._shape_masks(k, *np.array([[32], [32], [h]]))[0, 32 - h:32 + h, 32 - h:32 + h]
            for k, s in enumerate(SHAPES) for h in _HALVES}
# centroid minus box centre, [shape id, half] -> (dx, dy): only a triangle's is off centre (h/3 below it)
_OFFSETS = np.zeros((len(SHAPES), _HALVES[-1] + 1, 2))
for (name, h), sprite in _SPRITES.items():
    _OFFSETS[SHAPES.index(name), h] = np.argwhere(sprite).mean(axis=0)[::-1] + 0.5 - h
_AXES = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}  # where B lies from A
DEFINITION, CLEAR, LOOSE = (1.0, REL_MARGIN), (2.0, REL_MARGIN), (0.5, 1.0)  # (slope, margin) of a relation test


def holds(relation: str, a, b, test: tuple[float, float] = DEFINITION) -> np.ndarray:
    """Whether "A <relation> B" for centroids a, b (..., 2): along >= slope * |across| + margin, where along is
    B - A projected on the relation's axis and across the rest. Broadcasts over leading dimensions."""
    ux, uy = _AXES[relation]
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (..., 2)
    along, across = d[..., 0] * ux + d[..., 1] * uy, np.abs(d[..., 0] * uy - d[..., 1] * ux)
    slope, margin = test
    return along >= slope * across + margin


def heldout_shown(objects) -> list[str]:
    """The held-out compositions a picture with these objects shows (empty for any training picture)."""
    shown = []
    for n, shape in HELDOUT_COUNTS:
        if sum(o.shape == shape for o in objects) == n:
            shown.append(f"{NUMBERS[n]} {PLURALS[shape]}")
    present = {(o.color, o.shape) for o in objects}
    shown += [" with ".join(" ".join(p) for p in b) for b in HELDOUT_BINDINGS if set(b) <= present]
    for a, b in itertools.permutations(objects, 2):
        for fact in HELDOUT_RELATIONS:
            if (a.shape, b.shape) == (fact[0], fact[2]) and holds(fact[1], (a.x, a.y), (b.x, b.y), LOOSE):
                shown.append(" ".join(fact))
    return shown


# -----------------------------------------------------------------------------
# sampling and rendering


def sample_prompts(n: int, rng: np.random.Generator | int, split: str = "train",
                   category: str | None = None) -> list[Prompt]:
    """n prompts: a category uniformly (GenEval's overall is their mean), then a prompt of it uniformly."""
    rng = np.random.default_rng(rng)
    names = [c for c in ([category] if category else CATEGORIES) if prompts(split, c)]
    pools = [prompts(split, c) for c in names]  # the heldout split has no single-object or colour prompts
    if not pools:
        raise ValueError(f"the {split!r} split has no {category!r} prompts")
    which = rng.integers(len(pools), size=n)
    index = rng.integers(np.array([len(pool) for pool in pools])[which])
    return [pools[w][i] for w, i in zip(which, index)]


def _place(half: np.ndarray, used: np.ndarray, relation: list[str | None], shape: np.ndarray,
           rng: np.random.Generator, candidates: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Integer box centres (n, K, 2) for objects of half-extents (n, K), one slot at a time: the first of `candidates`
    draws that clears every earlier box by GAP (slot 1 of a position scene: deep in the cone). -> (centres, placed)"""
    n, k = half.shape
    centre = np.zeros((n, k, 2), dtype=np.int64)
    placed = np.ones(n, dtype=bool)
    rows = np.arange(n)
    for j in range(k):
        lo, hi = BORDER + half[:, j], CANVAS - BORDER - half[:, j]  # the box [c - h, c + h) stays inside
        cand = rng.integers(lo[:, None, None], hi[:, None, None] + 1, size=(n, candidates, 2))  # (n, M, 2)
        good = np.ones((n, candidates), dtype=bool)
        for i in range(j):  # Chebyshev distance of centres vs the two half-extents plus the gap
            apart = np.abs(cand - centre[:, i, None, :]).max(axis=-1) >= (half[:, i] + half[:, j] + GAP)[:, None]
            good &= apart | ~used[:, i, None]
        if j == 1:
            for r in set(relation) - {None}:
                on = np.array([rel == r for rel in relation])
                a = centre[on, 0] + _OFFSETS[shape[on, 0], half[on, 0]]  # (m, 2) centroids of slot 0
                b = cand[on] + _OFFSETS[shape[on, 1], half[on, 1]][:, None, :]  # (m, M, 2)
                good[on] &= holds(r, a[:, None, :], b, CLEAR)
        pick = good.argmax(axis=1)
        centre[:, j] = cand[rows, pick]
        placed &= good[rows, pick] | ~used[:, j]
    return centre, placed


def _realise(prompts_: list[Prompt], rng: np.random.Generator, avoid: np.ndarray) -> list[Scene]:
    """One complete scene per prompt: the named objects and nothing else, unnamed attributes at random; where
    `avoid`, redrawn until the picture shows nothing held out."""
    n, k = len(prompts_), MAX_OBJECTS
    shape = np.zeros((n, k), dtype=np.int64)
    color, size = np.full((n, k), -1), np.full((n, k), -1)  # -1: not named, drawn at random
    used = np.zeros((n, k), dtype=bool)
    colors, sizes = list(COLORS), list(SIZE_HALVES)
    for i, p in enumerate(prompts_):
        things = p.things * p.count  # counting: count copies of its one thing
        for j, t in enumerate(things):
            shape[i, j], used[i, j] = SHAPES.index(t.shape), True
            color[i, j] = colors.index(t.color) if t.color else -1
            size[i, j] = sizes.index(t.size) if t.size else -1
    halves = np.array(list(SIZE_HALVES.values()))  # (2 size words, 2 choices)
    scenes, todo = [None] * n, np.arange(n)
    for _ in range(1000):  # four 12 px objects fit one draw in ~30 (a few ms a round): redraw failures
        m = len(todo)
        col = np.where(color[todo] < 0, rng.integers(len(COLORS), size=(m, k)), color[todo])
        siz = np.where(size[todo] < 0, rng.integers(len(sizes), size=(m, k)), size[todo])
        half = halves[siz, rng.integers(halves.shape[1], size=(m, k))]  # (m, k)
        centre, placed = _place(half, used[todo], [prompts_[i].relation for i in todo], shape[todo], rng)
        failed = []
        for row, i in enumerate(todo):
            slots = np.flatnonzero(used[i])
            objects = tuple(Obj(colors[col[row, j]], SHAPES[shape[i, j]], sizes[siz[row, j]],
                                *(centre[row, j] + _OFFSETS[shape[i, j], half[row, j]]).tolist())
                            for j in slots)
            boxes = tuple((int(centre[row, j, 0]), int(centre[row, j, 1]), int(half[row, j])) for j in slots)
            if not placed[row] or (avoid[i] and heldout_shown(objects)):
                failed.append(i)
                continue
            scenes[i] = Scene(prompts_[i], objects, boxes)
        todo = np.array(failed, dtype=np.int64)
        if not len(todo):
            return scenes
    raise RuntimeError(f"could not place {len(todo)} scenes, e.g. {caption(prompts_[todo[0]])!r}")


def render(scenes: list[Scene]) -> np.ndarray:
    """uint8 images (n, CANVAS, CANVAS, 3) of scenes: each object's sprite at its box, in its pure colour."""
    index = np.zeros((len(scenes), CANVAS, CANVAS), dtype=np.uint8)  # palette row + 1; 0 is black
    colors = list(COLORS)
    for i, scene in enumerate(scenes):
        for obj, (cx, cy, h) in zip(scene.objects, scene.boxes):
            index[i, cy - h:cy + h, cx - h:cx + h][_SPRITES[obj.shape, h]] = colors.index(obj.color) + 1
    palette = np.concatenate([np.zeros((1, 3), np.uint8), shapes._PALETTE])  # (7, 3): black, then the colours
    images = np.empty((*index.shape, 3), dtype=np.uint8)
    for c in range(3):  # one channel at a time: gathering 3-byte rows at once is slower
        images[..., c] = palette[:, c][index]
    return images  # (n, H, W, 3)


def draw_scenes(prompts_: list[Prompt | str], rng: np.random.Generator | int,
                avoid_heldout: bool | None = None) -> tuple[np.ndarray, list[Scene]]:
    """Fresh pictures (n, H, W, 3) and scenes for prompts or captions; by default one that names nothing held out
    gets a scene that shows nothing held out, as the training stream would."""
    rng = np.random.default_rng(rng)
    prompts_ = [_as_prompt(p) for p in prompts_]
    named = np.array([names_heldout(p) for p in prompts_], dtype=bool)
    avoid = ~named if avoid_heldout is None else np.full(len(prompts_), avoid_heldout)
    if (avoid & named).any():
        raise ValueError(f"{caption(prompts_[np.flatnonzero(avoid & named)[0]])!r} names a held-out composition: "
                         f"its scenes cannot avoid showing it")
    scenes = _realise(prompts_, rng, avoid)
    return render(scenes), scenes


def sample_scenes(n: int, rng: np.random.Generator | int, split: str = "train",
                  category: str | None = None) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random pictures (n, H, W, 3) uint8, captions and scenes. split: "train" never names or shows anything held
    out, "heldout" names one in every caption, "all" draws from everything."""
    rng = np.random.default_rng(rng)  # passes a Generator through, seeds a new one from an int
    chosen = sample_prompts(n, rng, split, category)
    images, scenes = draw_scenes(chosen, rng, avoid_heldout=split == "train")
    return images, [caption(p) for p in chosen], scenes


# -----------------------------------------------------------------------------
# the checker

_GRID = np.mgrid[:CANVAS, :CANVAS][::-1] + 0.5  # (2, H, W): x, y of every pixel centre
_AREAS = {key: int(m.sum()) for key, m in _SPRITES.items()}  # (shape, half) -> pixels
# small vs large by area: halfway between the largest small sprite and the smallest large one of that shape
_AREA_SPLIT = {s: (max(_AREAS[s, h] for h in SIZE_HALVES["small"]) + min(_AREAS[s, h] for h in SIZE_HALVES["large"]))
               / 2 for s in SHAPES}
# a blob far outside the world's sizes (a smear, a speck, two objects run together) is no object
_OBJECT_AREA = (min(_AREAS.values()) / 2, 2 * max(_AREAS.values()))


def _read(image: np.ndarray) -> tuple[list[Obj], int]:
    """Every object in a picture (H, W, 3), left to right, and how many bright regions are no object."""
    if image.shape != (CANVAS, CANVAS, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 picture of shape {(CANVAS, CANVAS, 3)}, got {image.dtype} {image.shape}")
    mask = shapes._foreground(image)
    labels = shapes._components(mask)
    objects, junk = [], 0
    for label, area in zip(*np.unique(labels[mask], return_counts=True)):
        if area < shapes._MIN_AREA:  # a speck of noise, not an attempt at an object
            continue
        blob = labels == label
        shape, iou = shapes._read_shape(blob, _GRID)
        if iou < shapes._MIN_IOU or not _OBJECT_AREA[0] <= area <= _OBJECT_AREA[1]:
            junk += 1
            continue
        x, y = shapes._centroid(blob)
        size = "small" if area < _AREA_SPLIT[shape] else "large"
        objects.append(Obj(shapes._read_color(image, blob), shape, size, float(x), float(y)))
    return sorted(objects, key=lambda o: (o.x, o.y)), junk


def read_scene(image: np.ndarray) -> list[Obj]:
    """The objects (colour, shape, size word, centroid) of a picture (H, W, 3) uint8, left to right."""
    return _read(image)[0]


def fits(obj: Obj, thing: Thing) -> bool:
    """Whether a read-back object is what a caption says of one object (a word it leaves out fits any value)."""
    return obj.shape == thing.shape and thing.color in (None, obj.color) and thing.size in (None, obj.size)


def fits_prompt(objects, prompt: Prompt | str, relation: bool = True) -> bool:
    """Whether objects are what a prompt asks, by GenEval's rule for its category: the named things are there
    (counting: exactly `count` of them; position: some pair in the relation, unless relation=False)."""
    p = _as_prompt(prompt)
    found = [[o for o in objects if fits(o, t)] for t in p.things]  # disjoint: two things differ in their words
    if p.category == "counting":
        return len(found[0]) == p.count
    if not all(found):
        return False
    return not relation or p.relation is None or any(holds(p.relation, (a.x, a.y), (b.x, b.y))
                                                     for a in found[0] for b in found[1])


def score(image: np.ndarray, prompt: Prompt | str, strict: bool = False) -> bool:
    """Whether a picture does what a prompt asks (fits_prompt on what the checker reads). strict: and nothing
    else."""
    p = _as_prompt(prompt)
    objects, junk = _read(image)
    if strict and (junk or len(objects) != p.count * len(p.things)):
        return False
    return fits_prompt(objects, p)


def geneval(images: np.ndarray, prompts_: list[Prompt | str], strict: bool = False) -> dict[str, float]:
    """Accuracy per category present, and "overall": their mean (GenEval's score)."""
    hits: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts_):
        p = _as_prompt(prompt)
        hits.setdefault(p.category, []).append(score(image, p, strict))
    result = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    result["overall"] = float(np.mean(list(result.values()))) if result else 0.0
    return result


# -----------------------------------------------------------------------------
# questions and answers


def _all_questions(objects) -> dict[str, list[tuple[str, str]]]:
    """Every question of each kind that these objects answer uniquely."""
    kinds = {kind: [] for kind in ("count", "color", "shape", "size", "exists", "relation")}
    for s in SHAPES:  # every shape (so "zero" is an answer), and the colours of those present
        kinds["count"].append((f"how many {PLURALS[s]}?", NUMBERS[sum(o.shape == s for o in objects)]))
        for c in COLORS:
            n = sum((o.color, o.shape) == (c, s) for o in objects)
            if n:
                kinds["count"].append((f"how many {c} {PLURALS[s]}?", NUMBERS[n]))
            kinds["exists"].append((f"is there a {c} {s}?", "yes" if n else "no"))
        same = [o for o in objects if o.shape == s]
        if len(same) == 1:
            kinds["color"].append((f"what colour is the {s}?", same[0].color))
    for c in COLORS:
        same = [o for o in objects if o.color == c]
        if len(same) == 1:
            kinds["shape"].append((f"what shape is the {c} object?", same[0].shape))
    for ref in objects:
        if sum((o.color, o.shape) == (ref.color, ref.shape) for o in objects) != 1:
            continue  # "the red circle" must name one object
        kinds["size"].append((f"what size is the {ref.color} {ref.shape}?", ref.size))
        for r in RELATIONS:
            near = [o for o in objects if o is not ref and holds(r, (o.x, o.y), (ref.x, ref.y), LOOSE)]
            if len(near) == 1 and holds(r, (near[0].x, near[0].y), (ref.x, ref.y), CLEAR):
                kinds["relation"].append((f"what is {r} the {ref.color} {ref.shape}?",
                                          f"a {near[0].color} {near[0].shape}"))
    return kinds


def questions(scene: Scene | list[Obj], rng: np.random.Generator | int, n: int = 4) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs of different kinds: a kind, then an answer of it, then a question with that
    answer, each at random (so "zero" does not crowd out "three", and "is there" answers yes as often as no)."""
    rng = np.random.default_rng(rng)
    kinds = _all_questions(scene.objects if isinstance(scene, Scene) else scene)
    pairs = []
    for kind in [k for k in rng.permutation(list(kinds)) if kinds[k]][:n]:
        answers = sorted({a for _, a in kinds[kind]})
        answer = answers[rng.integers(len(answers))]
        pool = [qa for qa in kinds[kind] if qa[1] == answer]
        pairs.append(pool[rng.integers(len(pool))])
    return pairs


def question_kind(question: str) -> str:
    for prefix, kind in (("how many", "count"), ("what colour", "color"), ("what shape", "shape"),
                         ("what size", "size"), ("is there", "exists"), ("what is", "relation")):
        if question.strip().lower().startswith(prefix):
            return kind
    raise ValueError(f"{question!r} is not a question of the scenes world")
