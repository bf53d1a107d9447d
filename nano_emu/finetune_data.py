"""A folder for fine-tuning a released model: its images tokenized once by the release's VQ, its token strings.

    folder = read_folder("my_icons", heldout_fraction=0.1, seed=0)     # folder.py's two conventions, checked
    recipe = Recipe(base.pipe, base.family, task="draw")               # the release's processing and strings
    codes = tokenize(folder.items, recipe, vq, "run/codes.safetensors")   # cached by content hash
    ids, targets, weights = batch([recipe.string(it.text, codes[it.key], rng) for it in items], recipe.pad)

Images are brought to the release's input as its own data preparation does:
- Emu3-Gen (draw): the image keeps its aspect ratio and is rescaled to the release's image area, each side a whole
  number of codes (emu3/train/prepare_data.py's area rescale, then the processor's rounding), which is the grid
  Pipeline.grid gives for that ratio: what the model is trained on is what it draws;
- Emu3-Chat (answer): the released processor (image.smart_resize: 512^2 to 1024^2 pixels), as Pipeline.answer;
- LlamaGen: ADM's center_crop_arr (box-halved while twice too big, bicubic, centre crop), as its extract_codes;
- Chameleon / Anole: the short side to 512 (LANCZOS) and the centre square, as its image tokenizer;
- tiny: folder.load_square at the run's image size, as train_tiny.py --data.
The codes are cached in one safetensors file keyed by the SHA-256 of each image file's bytes, with the VQ's
weights hash and the processing in its metadata: steps never run the VQ, and a folder that changed re-tokenizes
only the files that changed (a different VQ or processing re-tokenizes everything).

Strings follow each release's conventions (layout.py writes them; the loss weights say what is learned):
- draw: `generation_prompt(caption + the release's prompt suffix)` then the image block and EOS (LlamaGen: the
  class token, then the codes); loss on the block only. The caption is dropped (the unconditional string CFG
  needs: "" for Emu3's SFT null prompt and Chameleon, the null class for LlamaGen) with probability p_drop;
- answer: `understanding_prompt(codes, question, chat_template)` then the caption as the answer and EOS; loss on
  the answer only (Emu3-Chat's post-training);
- both (the tiny models, as train_tiny.py trains them): each example is one or the other, evenly.
Every learned token weighs 1, except for a tiny run, whose own loss weights (its checkpoint's sequence_options:
visual tokens 0.5, answers 2 in the default preset) are its "release's conventions" too.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, read_meta, save_checkpoint, weights_hash
from .folder import FolderError, load_square, scan, split_indices
from .image import MIN_PIXELS, MAX_PIXELS, image_to_tensor, load_image, smart_resize, to_tensor, upright_8bit

TASKS = ("draw", "answer", "both")


class Item(NamedTuple):
    file: Path
    text: str        # the caption (class folders: the class name)
    key: str         # SHA-256 of the file's bytes: the codes cache's key


class FolderData(NamedTuple):
    convention: str
    train: list[Item]
    heldout: list[Item]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_folder(root, heldout_fraction: float = 0.1, seed: int = 0, caption_column: str = "text") -> FolderData:
    """folder.scan's (file, caption) pairs, hashed, split into training and held-out items as train_tiny.py's
    Folder splits them (per caption where captions repeat, seeded)."""
    convention, pairs = scan(root, caption_column)
    if len(pairs) < 2:
        raise FolderError(f"{root} has {len(pairs)} image(s): fine-tuning needs at least 2 (one is held out)")
    items = [Item(Path(file), text, file_hash(Path(file))) for file, text in pairs]
    heldout = split_indices([it.text for it in items], heldout_fraction, np.random.default_rng([seed, 7]))
    return FolderData(convention, [it for it, h in zip(items, heldout) if not h],
                      [it for it, h in zip(items, heldout) if h])


def center_crop_arr(image: Image.Image, side: int) -> Image.Image:
    """LlamaGen's (ADM's) preprocessing: halve with a box filter while the short side is at least twice `side`,
    then bicubic to `side`, then the centre square (offsets rounded down)."""
    while min(image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), Image.BOX)
    scale = side / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), Image.BICUBIC)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as a viewer shows the file (EXIF orientations 5-8 swap the sides), without decoding it."""
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


class Recipe:
    """What a release makes of an image and a caption: the processing (pixels and their code grid) and the token
    strings of the task. `pipe` is the base's Pipeline; image_area overrides the release's pixels per image."""

    def __init__(self, pipe, family: str, task: str, question: str = "", p_drop: float = 0.0,
                 image_area: int | None = None, visual_weight: float = 1.0, answer_weight: float = 1.0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task != "draw" and pipe.layout.condition_only:
            raise ValueError("a class-to-image model (LlamaGen) writes no text: its task is draw")
        self.pipe, self.family, self.task, self.question, self.p_drop = pipe, family, task, question, p_drop
        self.visual_weight, self.answer_weight = visual_weight, answer_weight
        self.layout, self.tokenizer, self.factor = pipe.layout, pipe.tokenizer, pipe.vq.cfg.spatial_factor
        self.image_area = image_area or pipe.image_area
        self.pad = pipe.layout.pad
        if task == "answer" and image_area:   # evaluation and sampling read images at the same area
            pipe.resize = dict(min_pixels=image_area, max_pixels=image_area)
        self.tag = json.dumps({"family": family, "task": "answer" if task == "answer" else "draw",
                               "area": self.image_area, "resize": pipe.resize, "factor": self.factor})

    # --- pixels ----------------------------------------------------------------------------------------------

    @property
    def side(self) -> int:
        return math.isqrt(self.image_area)

    def grid(self, path: Path) -> tuple[int, int]:
        """The code grid (h, w) the file's image becomes, from its size alone."""
        if self.family == "emu3":
            width, height = upright_size(path)
            if self.task == "answer":
                limits = self.pipe.resize or dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
                h, w = smart_resize(height, width, self.factor, **limits)
                return h // self.factor, w // self.factor
            ratio = max(min(width / height, self.pipe.max_aspect_ratio), 1 / self.pipe.max_aspect_ratio)
            return self.pipe.grid(f"{ratio}:1")
        return self.side // self.factor, self.side // self.factor

    def pixels(self, path: Path) -> torch.Tensor:
        """The file as the release's VQ reads it: (3, H, W) in [-1, 1]."""
        if self.family == "tiny":
            return to_tensor(np.array(load_square(path, self.side)))
        if self.family == "emu3" and self.task == "answer":
            return image_to_tensor(path, factor=self.factor, **(self.pipe.resize or {}))
        if self.family == "chameleon":
            return image_to_tensor(path, square=self.side)
        image = upright_8bit(load_image(path)).convert("RGB")
        if self.family == "llamagen":
            image = center_crop_arr(image, self.side)
        else:   # Emu3-Gen: the grid's pixels, the aspect ratio kept
            h, w = self.grid(path)
            image = image.resize((w * self.factor, h * self.factor), Image.BICUBIC)
        return to_tensor(np.array(image))

    # --- strings ---------------------------------------------------------------------------------------------

    def draw(self, text: str, codes: torch.Tensor) -> tuple[list[int], list[int]]:
        """(prompt, what the model learns to write): the generation prompt, then the image block and EOS."""
        if self.layout.condition_only:   # LlamaGen: the class token, then the codes in raster order
            return self.tokenizer.encode(text), (codes.flatten() + self.layout.first_visual).tolist()
        h, w = codes.shape
        prompt = self.layout.generation_prompt(text, h, w, self.tokenizer)
        whole = self.layout.encode([text, codes], self.tokenizer, eos=True)
        assert whole[:len(prompt)] == prompt, "the layout's generation prompt is not a prefix of its string"
        return prompt, whole[len(prompt):]

    def answer(self, text: str, codes: torch.Tensor) -> tuple[list[int], list[int]]:
        prompt = self.layout.understanding_prompt(codes, self.question, self.tokenizer, self.pipe.chat_template)
        return prompt, self.tokenizer.encode(text) + [self.layout.eos]

    def string(self, text: str, codes: torch.Tensor, rng: np.random.Generator | None = None,
               task: str | None = None) -> tuple[list[int], list[float]]:
        """One training sequence and its per-target loss weights (0 on the prompt). rng None: no caption drop and,
        for task "both", the task given (default draw)."""
        task = task or self.task
        if task == "both":
            task = "answer" if rng is not None and rng.random() < 0.5 else "draw"
        if task == "answer":
            prompt, rest = self.answer(text, codes)
            weights = [self.answer_weight] * len(rest)
        else:
            dropped = rng is not None and self.p_drop > 0 and rng.random() < self.p_drop
            prompt, rest = self.draw("" if dropped else text + self.pipe.prompt_suffix, codes)
            visual = self.layout.is_visual(torch.tensor(rest)).tolist()
            weights = [self.visual_weight if v else 1.0 for v in visual]
        return prompt + rest, [0.0] * (len(prompt) - 1) + weights

    def longest(self, item: Item) -> int:
        """The longest string the item can make (drawn and, with an answer task, answered), from its file's size:
        the context check before the VQ reads a pixel."""
        upright_size(item.file)   # (every family: a file that is no image fails here, before the VQ)
        codes = torch.zeros(self.grid(item.file), dtype=torch.long)
        tasks = {"draw": ["draw"], "answer": ["answer"], "both": ["draw", "answer"]}[self.task]
        return max(len(self.string(item.text, codes, task=task)[0]) for task in tasks)


def batch(rows: list[tuple[list[int], list[float]]], pad: int):
    """Right-padded (ids, targets, weights), each (B, T - 1): causal attention never looks at the padding."""
    length = max(len(tokens) for tokens, _ in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    weights = torch.zeros(len(rows), length - 1)
    for i, (tokens, w) in enumerate(rows):
        ids[i, :len(tokens)] = torch.tensor(tokens)
        weights[i, :len(w)] = torch.tensor(w)
    return ids[:, :-1], ids[:, 1:], weights


# ---------------------------------------------------------------------------------------------------------------
# the codes cache


def cached_stamp(cache: Path, log) -> dict | None:
    """What the codes cache was made with; None where there is none, or one this code cannot read (an older
    format, a torn file): codes are derived data, so such a cache is tokenized again, not refused."""
    if not cache.is_file():
        return None
    try:
        return read_meta(cache).get("stamp")
    except ValueError as e:
        log(f"{cache} cannot be read ({e}): tokenizing the folder again")
        return None


def tokenize(items: list[Item], recipe: Recipe, vq, cache: Path, batch_size: int = 16, log=print
             ) -> dict[str, torch.Tensor]:
    """Codes (h, w) of every item's image by its key, from `cache` where it holds them for this VQ and processing;
    the rest through the VQ (same-grid images `batch_size` at a time), then the cache rewritten atomically with
    this folder's codes. Unreadable images raise FolderError naming them."""
    stamp = {"vq": weights_hash(vq.state_dict()), "processing": recipe.tag}
    codes = {}
    if cached_stamp(cache, log) == stamp:   # (one folder's codes: read whole)
        wanted = {it.key for it in items}
        codes = {key: c.long() for key, c in load_checkpoint(cache)[0].items() if key in wanted}
    todo = list({it.key: it for it in items if it.key not in codes}.values())
    if todo:
        log(f"tokenizing {len(todo)} image(s) with the release's VQ ({len(codes)} cached)")
        groups: dict[tuple, list[Item]] = {}
        for item in todo:
            groups.setdefault(recipe.grid(item.file), []).append(item)
        device, dtype = next(vq.parameters()).device, next(vq.parameters()).dtype
        broken = []
        with torch.no_grad():
            for members in groups.values():
                for start in range(0, len(members), batch_size):
                    part, pixels = [], []
                    for item in members[start:start + batch_size]:
                        try:
                            pixels.append(recipe.pixels(item.file))
                            part.append(item)
                        except ValueError:
                            broken.append(item.file)
                    if part:
                        for item, c in zip(part, vq.encode(torch.stack(pixels).to(device, dtype)).cpu()):
                            codes[item.key] = c
        if broken:
            raise FolderError(f"{len(broken)} image(s) cannot be read (truncated or not images): "
                              f"{', '.join(map(str, broken[:5]))}; fix or remove them")
        small = torch.int16 if vq.cfg.codebook_size <= 2**15 else torch.int32
        save_checkpoint(cache, {k: v.to(small) for k, v in codes.items()}, {"stamp": stamp})
    return codes
