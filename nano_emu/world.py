"""What train_tiny.py trains on: a *world*, behind one interface, so the training loop never asks which one.

A world yields examples (pixels with the texts that go with them) and, when it has a checker, scores drawings.
The built-in ones are adapters over the modules that define them; a user's own images are folder.Folder:

    Shapes()          one shape on black, "a red circle in the top left"            (shapes.py)
    MovingShapes()    8-frame clips of one moving shape, "a red circle moving left"  (shapes.py)
    Scenes()          1-4 objects, captions with counts and relations, questions    (scenes.py)
    Folder(path)      a captioned (imagefolder) or class-folder (ImageFolder) tree   (folder.py)

train.py reads `sample` / `pool` (training) and evaluate.py the rest (metrics through the same Pipeline a user
samples with). Every method that takes a `split` knows "train" (what training sees) and "heldout" (what it never
sees: held-out combinations for the toy worlds, held-out files for a folder).

An example is understood through (question, answer) strings: ("", caption) is captioning, Emu3's 'U' mode with an
empty question; Scenes adds real questions. A drawing is scored against a world-specific *target* (the shapes
world's (colour, shape, position) triple, a scenes prompt); worlds without a checker have no targets.
"""

import re
from typing import NamedTuple

import numpy as np

from . import plans, scenes, shapes


class Examples(NamedTuple):
    pixels: np.ndarray                      # uint8 (N, H, W, 3), or (N, T, H, W, 3) for clips
    captions: list[str]                     # what each is drawn from (caption -> image strings)
    answers: list[list[tuple[str, str]]]    # what each is understood with: (question, answer); ("", caption) first
    targets: list | None = None             # what the checker scores a drawing of each caption against
    plans: list[str] | None = None          # each picture's layout in words (plans.py), where the world has plans


class World:
    """The interface, with the defaults of a world that has no checker. Subclasses set the class attributes and
    implement `sample`; a world with a checker also implements `draw_tasks` and `score`."""

    name = "world"
    image_size = 64                 # square images of this many pixels
    frames: int | None = None       # pixel frames of an example (clips), None for images
    prefix = ""                     # of its metric names in metrics.json ("clip_" for clips beside images)
    plans = False                   # its examples carry a plan (their layout in words) for the plan segment
    checker = False                 # score() reads drawings back (draw_tasks, score)
    vq_split = "all"                # what the VQ's reconstructions are measured on
    finite = False                  # a fixed set of examples (a folder), not a generator of fresh ones

    def words(self) -> list[str] | None:
        """Every word the world's texts use, if its language is closed (a WordTokenizer then covers it); None:
        build the tokenizer from `texts()`."""
        return None

    def texts(self) -> list[str]:
        """Every caption of the world (held-out ones too: the evaluation writes them), for building a tokenizer
        and for checking that each fits the context."""
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator, split: str = "train") -> Examples:
        raise NotImplementedError

    def where(self, text: str) -> str:
        """Where a text comes from, for error messages ("" for the built-in worlds)."""
        return ""

    def pool(self, n: int, rng: np.random.Generator) -> Examples:
        """The GPT's training examples, VQ-encoded once: n fresh ones (a folder: all of its training files)."""
        return self.sample(n, rng)

    # --- evaluation ------------------------------------------------------------------------------------

    def draw_tasks(self, repeats: int) -> dict[str, tuple[list[str], list]]:
        """group -> (captions to draw, their targets). Empty without a checker."""
        return {}

    def score(self, pixels: np.ndarray, targets: list) -> dict[str, float]:
        """Drawings against their targets -> named rates; "adherence" is the headline (every attribute right)."""
        raise NotImplementedError

    def judge(self, pixels: np.ndarray, targets: list) -> list[bool]:
        """Each drawing right or wrong by the checker (the picture of checked drawings)."""
        raise NotImplementedError

    def category(self, target) -> str:
        """The row a drawing of `target` sits in, in the picture of checked drawings."""
        return ""

    def plan_agrees(self, plan: str, caption: str) -> bool:
        """Whether a written plan draws what the caption asks (worlds with plans)."""
        raise NotImplementedError

    # --- post-training (posttrain.py) ------------------------------------------------------------------

    def rollout_tasks(self, n: int, rng: np.random.Generator) -> tuple[list[str], list]:
        """n prompts to draw and judge, with their targets: from the training split only, never a held-out one."""
        examples = self.sample(n, rng, "train")
        return examples.captions, examples.targets if examples.targets is not None else examples.captions

    def reward(self, pixels: np.ndarray, captions: list[str], targets: list, reader=None) -> np.ndarray:
        """The post-training judge: 1.0 for a drawing that does what its caption asks, else 0.0. A world with a
        checker asks it (a subclass may ask more than the evaluation does); with a `reader` the model's own reading
        of its drawing judges instead (self_check), the only judge a world without a checker has."""
        if reader is None and not self.checker:
            raise ValueError(f"the {self.name} world has no checker: its drawings are judged by the model's own "
                             f"reading of them (a reader)")
        right = self.self_check(pixels, captions, targets, reader) if reader else self.judge(pixels, targets)
        return np.array(right, dtype=float)

    def self_check(self, pixels: np.ndarray, captions: list[str], targets: list, reader) -> list[bool]:
        """Whether the model reads each drawing as its caption: reader(pixels, question) -> its greedy answers
        ("" asks for a caption). A world whose captions say everything compares them word for word."""
        return [r.strip() == c.strip() for r, c in zip(reader(pixels, ""), captions, strict=True)]

    def answer_tasks(self, n: int, rng: np.random.Generator) -> dict[str, Examples]:
        """group -> fresh examples to caption / answer about, scored by exact match (answer_accuracy)."""
        return {"seen": self.sample(n, rng, "train"), "heldout": self.sample(max(12, n // 2), rng, "heldout")}

    def answer_accuracy(self, predicted: list[str], expected: list[str], questions: list[str],
                        pixels: np.ndarray) -> dict[str, float]:
        """Answers about `pixels` against the expected ones: {"caption_accuracy": exact match (whitespace
        trimmed)}; worlds that ask questions add one rate per kind of question."""
        hits = [p.strip() == e.strip() for p, e in zip(predicted, expected, strict=True)]
        return {"caption_accuracy": float(np.mean(hits)) if hits else float("nan")}

    def showcase(self) -> tuple[list[str], int]:
        """Captions for the sample grid, and how many of them (at the end) are held out."""
        return [], 0


class Shapes(World):
    name = "shapes"
    checker = True
    heldout_factor = 8   # only 6 held-out triples: more samples each

    def words(self):
        return shapes.vocabulary()

    def texts(self):
        return [shapes.caption(*t) for t in shapes.TRAIN_TRIPLES]

    def sample(self, n, rng, split="train"):
        images, captions, attrs = shapes.sample_shapes(n, rng, split=split)
        return Examples(images, captions, [[("", c)] for c in captions], attrs)

    def draw_tasks(self, repeats):
        return {split: ([shapes.caption(*t) for t in triples for _ in range(repeats * factor)],
                        [t for t in triples for _ in range(repeats * factor)])
                for split, triples, factor in (("seen", shapes.TRAIN_TRIPLES, 1),
                                               ("heldout", shapes.HELDOUT, self.heldout_factor))}

    def score(self, pixels, targets):
        rates = shapes.score(pixels, targets)
        return {"adherence": rates.pop("all"), **rates, **shapes.fill_in_range(pixels, [t[1] for t in targets])}

    def judge(self, pixels, targets):
        return [shapes.classify(x) == tuple(t) for x, t in zip(pixels, targets)]

    def reward(self, pixels, captions, targets, reader=None):
        """Colour, shape and position right AND the shape crisp (its fill in shapes.FILL_RANGES): post-training
        is asked for square corners too."""
        if reader is not None:
            return super().reward(pixels, captions, targets, reader)
        crisp = [(f := shapes.fill(x)) is not None and shapes.FILL_RANGES[t[1]][0] <= f <= shapes.FILL_RANGES[t[1]][1]
                 for x, t in zip(pixels, targets)]
        return np.array(self.judge(pixels, targets), dtype=float) * np.array(crisp, dtype=float)

    def category(self, target):
        return target[1]   # the shape

    # every colour, shape and position, all seen in training; then two held-out triples
    SHOWCASE = [("red", "circle", "top left"), ("green", "square", "bottom right"), ("blue", "triangle", "center"),
                ("yellow", "square", "top right"), ("cyan", "triangle", "bottom left"),
                ("magenta", "square", "center")]

    def showcase(self):
        return [shapes.caption(*t) for t in self.SHOWCASE] + [shapes.caption(*t) for t in shapes.HELDOUT[:2]], 2


class MovingShapes(World):
    name = "moving shapes"
    frames = shapes.VIDEO_FRAMES
    prefix = "clip_"
    checker = True
    TRIPLES = [(c, s, d) for c in shapes.COLORS for s in shapes.SHAPES for d in shapes.DIRECTIONS]
    # a clip per row in clips.png: every colour, shape and direction
    SHOWCASE = [("red", "circle", "left"), ("green", "square", "down"), ("blue", "triangle", "right"),
                ("yellow", "square", "up"), ("cyan", "circle", "right"), ("magenta", "triangle", "left")]

    def words(self):
        return shapes.vocabulary()

    def texts(self):
        return [shapes.video_caption(*t) for t in self.TRIPLES]

    def sample(self, n, rng, split="train"):   # no held-out combinations: every split is the same world
        clips, captions, attrs = shapes.sample_moving_shapes(n, rng)
        return Examples(clips, captions, [[("", c)] for c in captions], attrs)

    def draw_tasks(self, repeats):   # repeats: clips in all, cycling through every (colour, shape, direction)
        attrs = [self.TRIPLES[i % len(self.TRIPLES)] for i in range(repeats)]
        return {"": ([shapes.video_caption(*t) for t in attrs], attrs)}

    def score(self, pixels, targets):
        rates = shapes.score(pixels, targets)
        return {"adherence": rates.pop("all"), **rates}

    def judge(self, pixels, targets):   # colour, shape and direction
        return [shapes.classify_video(x) == tuple(t) for x, t in zip(pixels, targets)]

    def answer_tasks(self, n, rng):
        return {"": self.sample(n, rng)}

    def showcase(self):
        return [shapes.video_caption(*t) for t in self.SHOWCASE], 0


def normalise_answer(text: str) -> str:
    """Lower case, words only, digits as number words, no leading article: "A red circle." -> "red circle"."""
    words = [scenes.NUMBERS[int(w)] if w.isdigit() and int(w) < len(scenes.NUMBERS) else w
             for w in re.findall(r"[a-z]+|\d+", text.lower())]
    return " ".join(words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words)


def qa_score(predictions: list[str], pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Exact-match accuracy of predicted answers to scenes questions (after normalise_answer), over all pairs and
    per kind of question."""
    hits: dict[str, list[bool]] = {}
    for pred, (question, answer) in zip(predictions, pairs, strict=True):
        correct = normalise_answer(pred) == normalise_answer(answer)
        hits.setdefault("all", []).append(correct)
        hits.setdefault(scenes.question_kind(question), []).append(correct)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def described_objects(prompt: "scenes.Prompt") -> list["scenes.Obj"]:
    """The objects a caption of scenes.describe() says a picture holds (no positions: centroids 0; what it leaves
    out, None), so that what the model reads can be checked against a prompt."""
    return [scenes.Obj(t.color, t.shape, t.size, 0.0, 0.0) for t in prompt.things * prompt.count]


class Scenes(World):
    """scenes.py: GenEval's six categories, scored per category; captions and questions to understand."""

    name = "scenes"
    checker = True
    questions_per_scene = 4

    def __init__(self, plans: bool = False):
        self.plans = plans   # the examples carry their plans (plans.py), for a run trained with --plan

    def words(self):
        return scenes.vocabulary() + (plans.WORDS if self.plans else [])

    def texts(self):
        return [scenes.caption(p) for p in scenes.prompts("train")]

    def sample(self, n, rng, split="train"):
        images, captions, drawn = scenes.sample_scenes(n, rng, split=split)
        answers = [[("", scenes.describe(s.objects))] + scenes.questions(s, rng, self.questions_per_scene)
                   for s in drawn]   # drawn from any caption of the grammar; captioned with the one that says most
        return Examples(images, captions, answers, [scenes.parse(c) for c in captions],
                        [plans.write(s.objects) for s in drawn] if self.plans else None)

    def draw_tasks(self, repeats):
        """Every category's prompts, seen and held-out, `repeats` x 12 draws per category (12: the number of
        prompts a category is sampled with, so a category's score is not one prompt's luck)."""
        rng = np.random.default_rng(12345)   # which prompts: fixed, so every run is scored on the same ones
        tasks = {}
        for split in ("seen", "heldout"):
            prompts = [p for category in scenes.CATEGORIES
                       for p in self._some(scenes.prompts("train" if split == "seen" else "heldout", category), rng)
                       for _ in range(repeats)]
            tasks[split] = ([scenes.caption(p) for p in prompts], prompts)
        return tasks

    @staticmethod
    def _some(prompts, rng, k: int = 12):
        return [prompts[i] for i in rng.choice(len(prompts), size=min(k, len(prompts)), replace=False)] if prompts \
            else []

    def score(self, pixels, targets):
        rates = scenes.geneval(pixels, targets)
        return {"adherence": rates.pop("overall"), **rates}

    def judge(self, pixels, targets):
        return [scenes.score(x, p) for x, p in zip(pixels, targets)]

    def reward(self, pixels, captions, targets, reader=None):
        """The checker, strict: what the caption names AND nothing else (the captions promise it), so a drawing
        cannot earn its reward with extra objects."""
        if reader is not None:
            return super().reward(pixels, captions, targets, reader)
        return np.array([scenes.score(x, p, strict=True) for x, p in zip(pixels, targets)], dtype=float)

    def self_check(self, pixels, captions, targets, reader):
        """The model's caption of its drawing (the most specific one it knows, describe()) must name what the
        prompt asks and nothing else; for a position prompt the model must also answer the question the prompt
        implies ("what is left of the blue square?" -> "a red circle"), asked with the colours it read."""
        read = [scenes.parse(c) for c in reader(pixels, "")]
        right = [r is not None and len(described_objects(r)) == p.count * len(p.things)
                 and scenes.fits_prompt(described_objects(r), p, relation=False) for r, p in zip(read, targets)]
        asked = [(i, p) for i, (p, ok) in enumerate(zip(targets, right)) if ok and p.relation is not None]
        questions = {}
        for i, p in asked:
            objects = described_objects(read[i])
            a = next(o for o in objects if scenes.fits(o, p.things[0]))
            b = next(o for o in objects if scenes.fits(o, p.things[1]))
            questions[i] = (f"what is {p.relation} the {b.color} {b.shape}?", f"a {a.color} {a.shape}")
        for question in dict.fromkeys(q for q, _ in questions.values()):
            index = [i for i, (q, _) in questions.items() if q == question]
            for i, answer in zip(index, reader(pixels[index], question)):
                right[i] = normalise_answer(answer) == normalise_answer(questions[i][1])
        return right

    def category(self, target):
        return target.category

    def plan_agrees(self, plan, caption):
        return plans.agrees(plan, caption)

    def answer_tasks(self, n, rng):
        return {"seen": self.sample(n, rng, "train"), "heldout": self.sample(max(12, n // 2), rng, "heldout")}

    def answer_accuracy(self, predicted, expected, questions, pixels):
        """Captions: "caption_exact" is the exact match with the picture's one caption (scenes.describe: the most
        specific true and complete one); "caption_accuracy" counts any caption of the grammar that is true of the
        picture and complete (scenes.score strict: every object named), however little it says. Questions:
        exact match after normalise_answer, overall and per kind."""
        result = {}
        captions = [(p, e, x) for p, e, q, x in zip(predicted, expected, questions, pixels) if not q]
        if captions:
            result["caption_accuracy"] = float(np.mean([scenes.parse(p) is not None and scenes.score(x, p, strict=True)
                                                        for p, _, x in captions]))
            result["caption_exact"] = float(np.mean([p.strip() == e for p, e, _ in captions]))
        pairs = [(p, (q, e)) for p, e, q in zip(predicted, expected, questions) if q]
        if pairs:
            rates = qa_score([p for p, _ in pairs], [qa for _, qa in pairs])
            result.update({"qa_accuracy": rates.pop("all"), **{f"qa_{k}": v for k, v in rates.items()}})
        return result

    def showcase(self):
        shown = [scenes.caption(scenes.prompts("train", c)[0]) for c in scenes.CATEGORIES]
        held = [scenes.caption(scenes.prompts("heldout", c)[0]) for c in scenes.CATEGORIES
                if scenes.prompts("heldout", c)]
        return shown + held[:2], min(2, len(held))
