"""Your own images as a world: a folder in one of the two conventions people already have.

- captioned, Hugging Face's `imagefolder`: images (subfolders allowed) and a `metadata.jsonl` or `metadata.csv`
  whose rows name an image (`file_name`, relative to the metadata file's folder) and its caption (`text`):

      my_icons/metadata.jsonl       {"file_name": "cats/001.png", "text": "a grey cat on a sofa"}
      my_icons/cats/001.png

- class folders, torchvision's `ImageFolder`: `FOLDER/<class name>/*.png|jpg|...` (any depth below the class
  folder); the caption is the class name, so the model is class-conditional (LlamaGen's c2i at toy scale) and its
  captions are a classifier.

The folder is scanned and checked before any training step, so bad data never costs a ten-minute run: a metadata
row naming a missing file, an image without a caption, an empty folder, a folder with one class, a metadata file
without the `file_name` / `text` columns, bad JSON: each one `FolderError` (a ValueError) with one clear line.
Unreadable or truncated images are listed (the first few names and the count) and skipped, or refused with
strict=True.

Every image is brought to the run's square size as a user would expect: the EXIF orientation applied, 16-bit and
float greyscale scaled to 8 bits (image.upright_8bit), transparency blended onto `background` (white by default,
as Chameleon's reference does; black matches the toy worlds), the short side resized to `image_size` (bicubic,
which PIL antialiases when shrinking), and the centre square cropped. All of them are held in memory as uint8.

A fixed fraction of the images (seeded) is held out: training never sees them, and the evaluation's VQ PSNR,
image-token likelihood and caption accuracy are measured on them. When captions repeat (class folders), the split
is made per caption, so every class keeps its share in both halves.
"""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .image import flatten_alpha, load_image, upright_8bit
from .world import Examples, World

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
METADATA = ("metadata.jsonl", "metadata.csv")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHOWN = 5   # names listed when several files share a problem


class FolderError(ValueError):
    """The folder does not follow either convention, or its data is broken: the message says what and where."""


def _listing(paths: list, root: Path) -> str:
    names = ", ".join(str(Path(p).relative_to(root)) for p in paths[:SHOWN])
    return names + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _metadata_rows(path: Path, caption_column: str) -> list[tuple[str, str, str]]:
    """(file_name, caption, where) rows of one metadata.jsonl / metadata.csv."""
    rows = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FolderError(f"{path} line {number} is not JSON ({e.msg}): every line of a metadata.jsonl is "
                                  f"one object like {{\"file_name\": \"a.png\", \"text\": \"a caption\"}}") from None
            if not isinstance(row, dict):
                raise FolderError(f"{path} line {number} is {type(row).__name__}, not a JSON object")
            rows.append((row, f"{path} line {number}"))
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(row, f"{path} row {number}") for number, row in enumerate(csv.DictReader(f), 2)]
    out = []
    for row, where in rows:
        missing = [c for c in ("file_name", caption_column) if c not in row]
        if missing:
            raise FolderError(f"{where} has the columns {sorted(row)}, not {' and '.join(map(repr, missing))}: the "
                              f"imagefolder convention names each image in 'file_name' and its caption in "
                              f"'{caption_column}'")
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise FolderError(f"{where}: the image {row['file_name']!r} has no caption (an empty '{caption_column}')")
        out.append((str(row["file_name"]), " ".join(caption.split()), where))
    return out


def scan(root: str | Path, caption_column: str = "text") -> tuple[str, list[tuple[Path, str]]]:
    """The folder's convention ("captioned" or "class folders") and its (image file, caption) pairs, checked:
    raises FolderError on anything that breaks the convention. Images are not opened yet."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"{root} is not a folder" if root.exists() else f"no folder {root}")
    metadata = sorted(p for name in METADATA for p in root.rglob(name))
    if metadata:
        pairs, seen = [], {}
        for path in metadata:
            if path.with_suffix(".csv" if path.suffix == ".jsonl" else ".jsonl").is_file():
                raise FolderError(f"{path.parent} holds both metadata.jsonl and metadata.csv: keep one")
            for name, caption, where in _metadata_rows(path, caption_column):
                file = (path.parent / name).resolve()
                if not file.is_file():
                    raise FolderError(f"{where} names {name!r}, which is not in {path.parent}")
                if file in seen:
                    raise FolderError(f"{where} names {name!r} again (first in {seen[file]})")
                seen[file] = where
                pairs.append((file, caption))
        uncaptioned = [p for p in _image_files(root) if p.resolve() not in seen]
        if uncaptioned:
            raise FolderError(f"{len(uncaptioned)} image(s) in {root} have no row in its metadata, so no caption: "
                              f"{_listing(uncaptioned, root)}; add rows for them or move them out")
        if not pairs:
            raise FolderError(f"the metadata in {root} lists no images")
        return "captioned", pairs
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c.name: _image_files(c) for c in classes}
    files = {name: found for name, found in files.items() if found}
    if not files:
        loose = _image_files(root)
        raise FolderError(f"{root} has no images: expected class subfolders (FOLDER/<class>/*.png) or a "
                          f"metadata.jsonl with file_name and text" if not loose else
                          f"{root} holds {len(loose)} image(s) but no captions: add a metadata.jsonl (one "
                          f"{{\"file_name\": ..., \"text\": ...}} per line) or sort them into class subfolders")
    if len(files) == 1:
        raise FolderError(f"{root} has one class ({next(iter(files))!r}): a class-conditional model needs at least "
                          f"two class subfolders (or give captions in a metadata.jsonl)")
    return "class folders", [(file, name) for name, found in files.items() for file in found]


def load_square(path: Path, side: int, background=(255, 255, 255)) -> np.ndarray:
    """One image file -> uint8 (side, side, 3): upright, 8-bit, transparency flattened, short side resized to
    `side`, centre square cropped. Raises ValueError naming the file when it cannot be decoded."""
    image = flatten_alpha(upright_8bit(load_image(path)), background).convert("RGB")
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)))


def split_indices(captions: list[str], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A held-out mask: `fraction` of the images, per caption where captions repeat (a class with one image stays
    in training), at least one image in all."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    heldout = np.zeros(len(captions), dtype=bool)
    if max(len(g) for g in groups.values()) > 1:   # captions repeat: stratify
        for members in groups.values():
            k = int(round(fraction * len(members))) if len(members) > 1 else 0
            heldout[rng.choice(members, size=k, replace=False)] = True
    else:
        heldout[rng.choice(len(captions), size=int(round(fraction * len(captions))), replace=False)] = True
    if not heldout.any():
        heldout[rng.integers(len(captions))] = True
    return heldout


class Folder(World):
    """A user's folder (see the module docstring). Reads and checks everything in __init__."""

    vq_split = "heldout"   # the VQ is measured on images it never trained on
    finite = True

    def __init__(self, root: str | Path, image_size: int = 64, heldout_fraction: float = 0.1, seed: int = 0,
                 strict: bool = False, background: str = "white", caption_column: str = "text", log=print):
        self.root, self.image_size = Path(root), image_size
        self.name = f"folder {self.root}"
        self.convention, pairs = scan(self.root, caption_column)
        pixels, captions, broken, self.files = [], [], [], []
        for file, caption in tqdm(pairs, desc=f"reading {self.root}", leave=False, disable=len(pairs) < 200):
            try:
                pixels.append(load_square(file, image_size, BACKGROUNDS[background]))
                captions.append(caption)
                self.files.append(file)
            except ValueError:
                broken.append(file)
        if broken:
            what = f"{len(broken)} of {len(pairs)} images cannot be read (truncated or not images): " \
                   f"{_listing(broken, self.root)}"
            if strict:
                raise FolderError(f"{what}; --strict refuses them (fix or remove them, or drop --strict)")
            log(f"skipping {what}")
        if len(pixels) < 2:
            raise FolderError(f"{self.root} has {len(pixels)} readable image(s): training needs at least 2")
        self.pixels, self.captions, self.skipped = np.stack(pixels), captions, len(broken)
        heldout = split_indices(captions, heldout_fraction, np.random.default_rng([seed, 7]))
        self.split = {"train": np.flatnonzero(~heldout), "heldout": np.flatnonzero(heldout)}
        counts = Counter(captions)
        self.repeats = max(counts.values()) > 1        # caption accuracy means something only then
        self.frequent = [c for c, _ in counts.most_common(6)]
        log(f"{self.root}: {self.convention}, {len(pixels)} images at {image_size}x{image_size}, "
            f"{len(counts)} distinct captions; {len(self.split['heldout'])} held out")

    def texts(self):
        return list(self.captions)   # held-out captions too: the evaluation writes them, a user may prompt them

    def where(self, text):
        return f"{self.files[self.captions.index(text)]}: " if text in self.captions else ""

    def _examples(self, index: np.ndarray) -> Examples:
        captions = [self.captions[i] for i in index]
        return Examples(self.pixels[index], captions, [[("", c)] for c in captions], captions)

    def sample(self, n, rng, split="train"):
        index = self.split[split]
        return self._examples(index[rng.integers(len(index), size=n)])

    def pool(self, n, rng):
        return self._examples(self.split["train"])   # every training image once: a folder is finite

    def answer_tasks(self, n, rng):
        if not self.repeats:   # every caption unique: an exact caption of a new image is not a fair ask
            return {}
        return {"seen": self.sample(n, rng, "train"), "heldout": self._examples(self.split["heldout"][:4 * n])}

    def showcase(self):
        return self.frequent, 0
