"""Tests for the scenes world (nano_emu/scenes.py): its grammar, held-out compositions, rendering, the checker
that reads every object back and scores prompts GenEval's way, and the questions."""
import itertools

import numpy as np
import pytest

from nano_emu import scenes
from nano_emu.shapes import COLORS, SHAPES
from nano_emu.scenes import CATEGORIES, CANVAS, Obj, Prompt, Scene, Thing
from nano_emu.tokenizer import WordTokenizer
from nano_emu.world import Scenes, normalise_answer, qa_score

PALETTE = np.array([(0, 0, 0), *COLORS.values()], dtype=np.uint8)


def blur(images: np.ndarray, k: int) -> np.ndarray:
    """k x k box blur with edge padding (k = 3 is roughly what a small VQ decoder does to a crisp edge)."""
    r = k // 2
    padded = np.pad(images.astype(np.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    out = sum(padded[:, i:i + CANVAS, j:j + CANVAS] for i in range(k) for j in range(k)) / k ** 2
    return out.round().astype(np.uint8)


def noisy(images: np.ndarray, rng: np.random.Generator, noise: float = 10, stray: int = 5) -> np.ndarray:
    """3x3 blur, Gaussian noise on every channel and `stray` random pixels in random palette colours."""
    out = np.clip(blur(images, 3) + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
    for image in out:
        ys, xs = rng.integers(CANVAS, size=(2, stray))
        image[ys, xs] = PALETTE[rng.integers(1, len(PALETTE), size=stray)]
    return out


def pool2(images: np.ndarray) -> np.ndarray:
    """2x2 average pooling then nearest upsampling: only 2 px detail survives."""
    n = len(images)
    small = images.astype(np.float32).reshape(n, CANVAS // 2, 2, CANVAS // 2, 2, 3).mean(axis=(2, 4))
    return np.repeat(np.repeat(small, 2, axis=1), 2, axis=2).round().astype(np.uint8)


def in_relation(relation: str, a, b, margin: float = 4) -> bool:
    """The docstring's definition written out: the offset A -> B along the axis beats |across| + margin."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= abs(across) + margin


def near_relation(relation: str, a, b) -> bool:
    """B lies within 60 degrees of A's `relation` axis: what a held-out relation must never show in training."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > 0 and abs(across) <= np.tan(np.radians(60)) * along


def shows_heldout(objects) -> bool:
    """Independent of scenes.heldout_shown: exactly 3 triangles or 4 circles, a held-out pair of objects, or a
    triangle near-above a circle or a square near-left of a triangle."""
    shapes = [o.shape for o in objects]
    if shapes.count("triangle") == 3 or shapes.count("circle") == 4:
        return True
    present = {(o.color, o.shape) for o in objects}
    pairs = [{("red", "circle"), ("blue", "square")}, {("green", "triangle"), ("yellow", "circle")},
             {("cyan", "square"), ("magenta", "triangle")}]
    if any(pair <= present for pair in pairs):
        return True
    for a, b in itertools.permutations(objects, 2):
        if (a.shape, b.shape) == ("triangle", "circle") and near_relation("above", (a.x, a.y), (b.x, b.y)):
            return True
        if (a.shape, b.shape) == ("square", "triangle") and near_relation("left of", (a.x, a.y), (b.x, b.y)):
            return True
    return False


def same_objects(read, truth, tolerance: float = 1e-9) -> bool:
    """The same objects (colour, shape, size word) at the same centroids, each read object matched to the true
    one nearest it."""
    if len(read) != len(truth):
        return False
    nearest = [min(read, key=lambda o: (o.x - t.x) ** 2 + (o.y - t.y) ** 2) for t in truth]
    return len(set(nearest)) == len(truth) and all(
        a[:3] == t[:3] and abs(a.x - t.x) <= tolerance and abs(a.y - t.y) <= tolerance for a, t in zip(nearest, truth))


# -----------------------------------------------------------------------------
# the grammar


def test_examples_parse():
    # written out literally, so a change to the grammar fails here
    assert scenes.parse("a circle") == Prompt("single_object", (Thing("circle"),))
    assert scenes.parse("a large square") == Prompt("single_object", (Thing("square", None, "large"),))
    assert scenes.parse("a red circle") == Prompt("colors", (Thing("circle", "red"),))
    assert scenes.parse("two blue squares") == Prompt("counting", (Thing("square", "blue"),), 2)
    assert scenes.parse("three triangles") == Prompt("counting", (Thing("triangle"),), 3)
    assert scenes.parse("a circle and a small square") == Prompt(
        "two_object", (Thing("circle"), Thing("square", None, "small")))
    assert scenes.parse("a red circle and a green square") == Prompt(
        "color_attr", (Thing("circle", "red"), Thing("square", "green")))
    assert scenes.parse("a red circle left of a green square") == Prompt(
        "position", (Thing("circle", "red"), Thing("square", "green")), 1, "left of")
    assert scenes.parse("a large cyan triangle above a small magenta circle") == Prompt(
        "position", (Thing("triangle", "cyan", "large"), Thing("circle", "magenta", "small")), 1, "above")


def test_grammar_round_trip_and_size():
    everything = scenes.prompts("all")
    counts = {c: sum(p.category == c for p in everything) for c in CATEGORIES}
    # 3 size options per "a ..." phrase; 18 colour-shape pairs; two-object captions name two different things
    assert counts == {"single_object": 3 * 3, "colors": 18 * 3, "counting": 3 * 7 * 3, "two_object": 6 * 9,
                      "color_attr": 18 * 17 * 9, "position": 18 * 17 * 9 * 4}
    captions = [scenes.caption(p) for p in everything]
    assert len(set(captions)) == len(captions)  # no two prompts read the same
    for p, text in zip(everything, captions):
        assert scenes.parse(text) == p
    assert max(len(text.split()) for text in captions) == 10


@pytest.mark.parametrize("text", [
    "", "a", "circle", "a purple circle", "a red circle please", "a red circles", "two red circle", "one circle",
    "five circles", "two large circles", "a circle and a circle", "a red circle and a red circle",
    "a small red circle and a large red circle", "a red circle and a square", "a circle left of a square",
    "a red circle left of a red circle", "a red circle beside a blue square", "a red circle left of",
    "a red circle above a blue square and a green triangle", "A red circle", "a red circle in the top left",
    "a large small circle", "a red large circle", "how many circles?"])
def test_parser_refuses_what_the_grammar_cannot_say(text):
    assert scenes.parse(text) is None
    with pytest.raises(ValueError, match="not a caption"):
        scenes.score(np.zeros((CANVAS, CANVAS, 3), np.uint8), text)


def test_vocabulary_covers_captions_questions_and_meta():
    words = scenes.vocabulary()
    assert len(words) == len(set(words)) and len(words) <= 60
    tok = WordTokenizer(words)
    texts = [scenes.caption(p) for p in scenes.prompts("all")] + ["8*8", "2*8*8"]
    _, _, drawn = scenes.sample_scenes(200, 0, split="all")
    rng = np.random.default_rng(0)
    texts += [t for scene in drawn for qa in scenes.questions(scene, rng, n=6) for t in qa]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


# -----------------------------------------------------------------------------
# held-out compositions


def test_splits_partition_the_grammar():
    train, heldout, everything = (set(scenes.prompts(s)) for s in scenes.SPLITS)
    assert train | heldout == everything and not train & heldout
    assert {p.category for p in train} == set(CATEGORIES)
    assert {p.category for p in heldout} == {"counting", "color_attr", "position"}
    assert all(scenes.names_heldout(p) for p in heldout) and not any(scenes.names_heldout(p) for p in train)
    with pytest.raises(ValueError, match="split"):
        scenes.sample_scenes(1, 0, split="test")
    with pytest.raises(ValueError, match="category"):
        scenes.prompts("train", "shapes")


def test_heldout_parts_are_all_seen():
    train = scenes.prompts("train")
    counting = {(p.count, p.things[0].shape) for p in train if p.category == "counting"}
    for n, shape in scenes.HELDOUT_COUNTS:
        assert (n, shape) not in counting
        assert any(m == n for m, _ in counting) and sum(s == shape for _, s in counting) >= 2
    bound = [{(t.color, t.shape) for t in p.things} for p in train if p.category == "color_attr"]
    for (c1, s1), (c2, s2) in scenes.HELDOUT_BINDINGS:
        assert {(c1, s1), (c2, s2)} not in bound
        assert any((c1, s1) in pair for pair in bound) and any((c2, s2) in pair for pair in bound)
        assert {(c2, s1), (c1, s2)} in bound  # the swapped binding is taught
    flip = {"below": "above", "right of": "left of"}
    facts = {(b.shape, flip[p.relation], a.shape) if p.relation in flip else (a.shape, p.relation, b.shape)
             for p in train if p.category == "position" for a, b in [p.things]}
    for a, relation, b in scenes.HELDOUT_RELATIONS:
        assert (a, relation, b) not in facts
        assert any(f[:2] == (a, relation) and f[2] != b for f in facts)  # A in that relation to something else
        assert any(f[1:] == (relation, b) and f[0] != a for f in facts)  # something else in it to B
        assert (b, relation, a) in facts  # the two shapes the other way round


def test_heldout_never_in_the_training_stream():
    rng = np.random.default_rng(123)
    seen_categories = set()
    for batch in range(40):  # 40 batches of 250 scenes, as a training loop would draw them
        images, captions, drawn = scenes.sample_scenes(250, rng)
        for text, scene in zip(captions, drawn):
            assert not scenes.names_heldout(text) and not shows_heldout(scene.objects), (text, scene.objects)
            seen_categories.add(scene.prompt.category)
        if batch < 2:  # and what the pixels show, read back
            assert not any(shows_heldout(scenes.read_scene(image)) for image in images)
    assert seen_categories == set(CATEGORIES)
    _, captions, drawn = scenes.sample_scenes(300, 1, split="heldout")
    assert all(scenes.names_heldout(text) and shows_heldout(scene.objects) for text, scene in zip(captions, drawn))


def test_seen_prompts_get_training_safe_scenes():
    _, drawn = scenes.draw_scenes(["a triangle and a circle"] * 300, 2)
    assert not any(shows_heldout(s.objects) for s in drawn)
    # objects[0] is the triangle, objects[1] the circle: never a triangle above the circle, but the other way round
    assert not any(in_relation("above", (s.objects[0].x, s.objects[0].y), (s.objects[1].x, s.objects[1].y))
                   for s in drawn)
    assert any(in_relation("above", (s.objects[1].x, s.objects[1].y), (s.objects[0].x, s.objects[0].y))
               for s in drawn)
    _, drawn = scenes.draw_scenes(["a triangle and a circle"] * 300, 2, avoid_heldout=False)
    assert any(shows_heldout(s.objects) for s in drawn)
    with pytest.raises(ValueError, match="held-out"):
        scenes.draw_scenes(["three triangles"], 0, avoid_heldout=True)


# -----------------------------------------------------------------------------
# sampling and rendering


def test_same_seed_same_data():
    a, b, c = (scenes.sample_scenes(64, seed) for seed in (7, np.random.default_rng(7), 8))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    rng = np.random.default_rng(0)
    assert scenes.sample_scenes(16, rng)[1] != scenes.sample_scenes(16, rng)[1]


def test_scenes_are_what_their_captions_say():
    images, captions, drawn = scenes.sample_scenes(600, 3, split="all")
    assert images.shape == (600, CANVAS, CANVAS, 3) and images.dtype == np.uint8
    assert {s.prompt.category for s in drawn} == set(CATEGORIES)
    for image, text, scene in zip(images, captions, drawn):
        p = scenes.parse(text)
        assert p == scene.prompt
        objects = scene.objects
        # complete: the named objects and nothing else, each with what the caption says
        assert len(objects) == p.count * len(p.things) and 1 <= len(objects) <= 4
        things = p.things * p.count
        assert all(o.shape == t.shape and t.color in (None, o.color) and t.size in (None, o.size)
                   for o, t in zip(objects, things))
        if p.relation:
            a, b = objects
            assert in_relation(p.relation, (a.x, a.y), (b.x, b.y))
            assert not any(in_relation(r, (a.x, a.y), (b.x, b.y)) for r in scenes.RELATIONS if r != p.relation)
        # pixels: black or the objects' pure colours; boxes inside the border and GAP apart
        assert set(map(tuple, image.reshape(-1, 3))) <= {(0, 0, 0), *(COLORS[o.color] for o in objects)}
        for (cx, cy, h), o in zip(scene.boxes, objects):
            assert h in scenes.SIZE_HALVES[o.size]
            assert scenes.BORDER <= cx - h and cx + h <= CANVAS - scenes.BORDER
            assert scenes.BORDER <= cy - h and cy + h <= CANVAS - scenes.BORDER
        for (x1, y1, h1), (x2, y2, h2) in itertools.combinations(scene.boxes, 2):
            assert max(abs(x1 - x2), abs(y1 - y2)) >= h1 + h2 + scenes.GAP


def test_sprites_fill_their_boxes():
    for shape, size in itertools.product(SHAPES, scenes.SIZE_HALVES):
        for h in scenes.SIZE_HALVES[size]:
            scene = Scene(Prompt("single_object", (Thing(shape),)), (Obj("red", shape, size, 0, 0),), ((30, 33, h),))
            mask = scenes.render([scene])[0].any(axis=-1)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (30 - h, 30 + h, 33 - h, 33 + h)
    assert max(scenes.SIZE_HALVES["small"]) < min(scenes.SIZE_HALVES["large"])


# -----------------------------------------------------------------------------
# the checker


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_checker_reads_every_scene_exactly(split):
    for seed in range(4):
        for category in (c for c in CATEGORIES if scenes.prompts(split, c)):
            images, captions, drawn = scenes.sample_scenes(12, [seed, CATEGORIES.index(category)], split, category)
            for image, text, scene in zip(images, captions, drawn):
                assert same_objects(scenes.read_scene(image), scene.objects), (text, scene)
                assert scenes.score(image, text) and scenes.score(image, text, strict=True)


@pytest.mark.parametrize("degradation", ["blur3", "blur3+noise", "blur5", "pool2"])
def test_checker_reads_degraded_scenes(degradation):
    rng = np.random.default_rng(4)
    images, captions, drawn = scenes.sample_scenes(240, rng, split="all")
    images = {"blur3": lambda x: blur(x, 3), "blur3+noise": lambda x: noisy(x, rng), "blur5": lambda x: blur(x, 5),
              "pool2": pool2}[degradation](images)
    for image, scene in zip(images, drawn):
        assert same_objects(scenes.read_scene(image), scene.objects, tolerance=1.0), (degradation, scene)
    assert scenes.geneval(images, captions, strict=True)["overall"] == 1.0


def test_checker_unreadable():
    rng = np.random.default_rng(0)
    black = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    assert scenes.read_scene(black) == []
    assert scenes.read_scene(np.clip(rng.normal(0, 8, black.shape), 0, 255).astype(np.uint8)) == []
    static = rng.integers(0, 256, black.shape, dtype=np.uint8)
    assert not scenes.score(static, "a square") and not scenes.score(np.full_like(black, 255), "a large square")
    # two same-coloured squares run together are one unreadable blob, not two squares
    touching = Scene(None, (Obj("red", "square", "large", 0, 0),) * 2, ((20, 30, 11), (42, 30, 11)))
    image = scenes.render([touching])[0]
    assert scenes.read_scene(image) == [] and not scenes.score(image, "two red squares")
    with pytest.raises(ValueError, match="uint8 picture"):
        scenes.read_scene(image.astype(np.float32) / 255)


def two_object_image(first: tuple, second: tuple) -> np.ndarray:
    """A hand-placed picture: (color, shape, half, cx, cy) per object."""
    objects = tuple(Obj(c, s, "small" if h < 10 else "large", 0, 0) for c, s, h, _, _ in (first, second))
    return scenes.render([Scene(None, objects, ((first[3], first[4], first[2]), (second[3], second[4], second[2])))])[0]


def test_score_follows_each_category():
    image = two_object_image(("red", "circle", 7, 16, 32), ("green", "square", 11, 46, 30))
    yes = ["a circle", "a small circle", "a large square", "a red circle", "a circle and a square",
           "a square and a small circle", "a red circle and a large green square",
           "a red circle left of a green square", "a green square right of a small red circle"]
    no = ["a triangle", "a large circle", "a small square", "a blue circle", "a green circle",
          "a circle and a triangle", "a green circle and a red square", "a red circle right of a green square",
          "a red circle above a green square", "a large red circle left of a green square", "two circles"]
    assert all(scenes.score(image, text) for text in yes)
    assert not any(scenes.score(image, text) for text in no)
    # GenEval tolerates extra objects, except that counting asks for exactly N; strict asks for nothing else
    assert scenes.score(image, "a red circle") and not scenes.score(image, "a red circle", strict=True)
    assert scenes.score(image, "a red circle and a green square", strict=True)
    diagonal = two_object_image(("red", "circle", 7, 16, 16), ("green", "square", 7, 46, 44))  # 30 right, 28 down
    assert not any(scenes.score(diagonal, f"a red circle {r} a green square") for r in scenes.RELATIONS)
    _, drawn = scenes.draw_scenes(["three red squares", "four squares"], 0)
    images = scenes.render(drawn)
    assert scenes.score(images[0], "three red squares") and scenes.score(images[0], "three squares")
    assert not scenes.score(images[0], "two red squares") and not scenes.score(images[0], "four red squares")
    assert scenes.score(images[1], "four squares") and not scenes.score(images[1], "three squares")


def test_geneval_summary():
    images, captions, _ = scenes.sample_scenes(300, 5)
    assert scenes.geneval(images, captions) == {**{c: 1.0 for c in CATEGORIES}, "overall": 1.0}
    images[::3] = 0  # a third drawn blank
    result = scenes.geneval(images, captions)
    per_category = {c: np.mean([i % 3 != 0 for i, t in enumerate(captions) if scenes.parse(t).category == c])
                    for c in CATEGORIES}
    assert result == pytest.approx({**per_category, "overall": np.mean(list(per_category.values()))})
    images, captions, _ = scenes.sample_scenes(60, 6, split="heldout")
    assert set(scenes.geneval(images, captions)) == {"counting", "color_attr", "position", "overall"}


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_scene_has_one_caption_that_says_most(split):
    """scenes.describe: the image -> text target. It is a caption of the grammar, true and complete of the picture,
    read back the same from the pixels, and says at least as much as the caption the scene was drawn from."""
    images, captions, drawn = scenes.sample_scenes(400, 11, split=split)
    for image, drawn_from, scene in zip(images, captions, drawn):
        text = scenes.describe(scene.objects)
        assert scenes.parse(text) is not None, text
        assert scenes.score(image, text, strict=True), (text, drawn_from)
        assert scenes.describe(scenes.read_scene(image)) == text
        assert len(text.split()) >= len(drawn_from.split()) or scenes.parse(drawn_from).category == "position"
    assert scenes.describe([Obj("red", "circle", "small", 40, 10), Obj("blue", "square", "large", 12, 30)]) == \
        "a large blue square and a small red circle"
    assert scenes.describe([Obj("red", "circle", "small", 40, 10), Obj("red", "circle", "large", 12, 30)]) == \
        "two red circles"


def test_world_judges_each_drawing_as_geneval_scores_them():
    """checked.png's borders (World.judge, a row per World.category) agree with the per-category rates."""
    world = Scenes()
    images, captions, _ = scenes.sample_scenes(120, 7)
    targets = [scenes.parse(c) for c in captions]
    images[::4] = 0   # a quarter drawn blank
    right = world.judge(images, targets)
    assert right == [i % 4 != 0 for i in range(len(images))]
    rates = world.score(images, targets)
    for category in CATEGORIES:
        mine = [r for r, t in zip(right, targets) if world.category(t) == category]
        assert rates[category] == pytest.approx(np.mean(mine))


# -----------------------------------------------------------------------------
# questions and answers


def check_answer(objects, question: str, answer: str) -> None:
    """Work each answer out from the objects again, and check the question was one the picture answers."""
    words = question.rstrip("?").split()
    kind = scenes.question_kind(question)
    if kind == "count":
        shape = words[-1][:-1]
        color = words[2] if len(words) == 4 else None
        assert answer == scenes.NUMBERS[sum(o.shape == shape and color in (None, o.color) for o in objects)]
    elif kind == "exists":
        assert answer == ("yes" if any((o.color, o.shape) == (words[3], words[4]) for o in objects) else "no")
    elif kind == "color":
        (only,) = [o for o in objects if o.shape == words[-1]]
        assert answer == only.color
    elif kind == "shape":
        (only,) = [o for o in objects if o.color == words[-2]]
        assert answer == only.shape
    else:
        color, shape = words[-2], words[-1]
        (ref,) = [o for o in objects if (o.color, o.shape) == (color, shape)]
        if kind == "size":
            assert answer == ref.size
            return
        relation = " ".join(words[2:-3])
        near = [o for o in objects if o is not ref and near_relation(relation, (o.x, o.y), (ref.x, ref.y))]
        assert len(near) == 1 and in_relation(relation, (near[0].x, near[0].y), (ref.x, ref.y))
        assert answer == f"a {near[0].color} {near[0].shape}"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_questions_have_unique_answers(split):
    rng = np.random.default_rng(7)
    _, _, drawn = scenes.sample_scenes(400, rng, split=split)
    asked = []
    for scene in drawn:
        pairs = scenes.questions(scene, rng)
        assert 1 <= len(pairs) <= 4 and len({scenes.question_kind(q) for q, _ in pairs}) == len(pairs)
        for question, answer in pairs:
            check_answer(scene.objects, question, answer)
        asked += pairs
    kinds = {scenes.question_kind(q) for q, _ in asked}
    assert kinds == {"count", "color", "shape", "size", "exists", "relation"}
    yes = [a == "yes" for q, a in asked if scenes.question_kind(q) == "exists"]
    assert 0.35 < np.mean(yes) < 0.65
    if split == "heldout":
        assert ("how many triangles?", "three") in asked and ("how many circles?", "four") in asked


def test_answers_normalise_and_score():
    assert normalise_answer("A red circle.") == normalise_answer("red circle") == "red circle"
    assert normalise_answer(" 2 ") == "two" and normalise_answer("Yes!") == "yes"
    pairs = [("how many circles?", "two"), ("what colour is the square?", "blue"),
             ("what is left of the green square?", "a red circle"), ("is there a red circle?", "no")]
    result = qa_score(["2", "Blue", "the red circle", "yes"], pairs)
    assert result == {"all": 0.75, "count": 1.0, "color": 1.0, "relation": 1.0, "exists": 0.0}
    with pytest.raises(ValueError):
        qa_score(["two"], pairs)  # one prediction per question
    with pytest.raises(ValueError, match="not a question"):
        scenes.question_kind("why is the sky blue?")
