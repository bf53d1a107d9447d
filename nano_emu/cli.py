"""What the command-line scripts (sample.py, train_tiny.py, bench.py) share: argparse types that refuse nonsense up
front, and what --device auto means.

A flag the library would choke on deep inside (`--temperature -1` surfaced as "codes must lie in [0, 512)",
`--top-k 0` as a tensor size mismatch) is refused while parsing, in one line that names the flag and the rule:

    sample.py: error: argument --top-k: must be >= 1, got 0

Each type is a plain function of the flag's text, so argparse reports its ArgumentTypeError with the flag's name.
Only user mistakes are turned into one line and exit code 2 (argparse's); bugs keep their traceback.
"""

import argparse
import math
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .hub import parse_id
from .image import load_clip, load_image


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is ONE line: argparse first prints the whole usage, which for a script
    with twenty flags buries the line that says what is wrong. Exit code 2, as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(kind: type, ok: Callable, rule: str) -> Callable[[str], int | float]:
    """An argparse type: the text as `kind` (int or float, finite), refused unless ok(value); `rule` says why."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def at_least(low: int | float, kind: type = int, note: str = "") -> Callable[[str], int | float]:
    return checked(kind, lambda value: value >= low, f">= {low}" + (f" ({note})" if note else ""))


def above(low: int | float, kind: type = float, note: str = "") -> Callable[[str], int | float]:
    return checked(kind, lambda value: value > low, f"> {low}" + (f" ({note})" if note else ""))


def ratio(text: str) -> str:
    """An aspect ratio "W:H" of two positive numbers; returned as text, which Pipeline.grid reads."""
    parts = text.split(":")
    try:
        sides = [float(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) != 2 or not all(math.isfinite(side) and side > 0 for side in sides):
        raise argparse.ArgumentTypeError(f"must be width:height with two positive numbers, e.g. 16:9, got {text!r}")
    return text


def resolve_device(name: str) -> torch.device:
    """--device auto picks CUDA, then Apple's MPS, then the CPU; anything else is passed to torch as is."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def existing_folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if Path(text).exists() else f"no folder {text}")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file" if Path(text).exists() else f"no file {text}")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no file or folder {text}")
    return text


def hub_id_or(kind: str, exists: Callable[[Path], bool], with_file: bool | None) -> Callable[[str], str]:
    """An argparse type for released weights: a local `kind` (a folder, a file, either), or a Hugging Face Hub id
    that hub.resolve fetches at load time: ORG/NAME[@REVISION] (with_file False), ORG/NAME[@REVISION]/FILE (True),
    or either (None). Whether the id exists is known only then; a path that is neither is refused here."""
    form = {False: "ORG/NAME", True: "ORG/NAME/FILE", None: "ORG/NAME or ORG/NAME/FILE"}[with_file]

    def parse(text: str) -> str:
        path = Path(text)
        if exists(path):
            return text
        parsed = None if path.exists() else parse_id(text)
        if parsed is not None and (with_file is None or (parsed[2] is not None) == with_file):
            return text
        what = f"{text} is not a {kind}" if path.exists() else f"no {kind} {text}"
        raise argparse.ArgumentTypeError(f"{what} (nor a Hugging Face Hub id {form})")
    return parse


hub_folder = hub_id_or("folder", Path.is_dir, with_file=False)           # --weights, --chameleon
hub_file = hub_id_or("file", Path.is_file, with_file=True)               # --llamagen
hub_path = hub_id_or("file or folder", Path.exists, with_file=None)      # --vq (a folder for Emu3, a file for LlamaGen)


def image_file(text: str) -> str:
    """A file PIL can open and decode (the same check pipeline.answer does later, done before the model loads)."""
    try:
        load_image(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def image_or_clip(text: str) -> str:
    """An image file, an animated GIF or a folder of frames (read as image.load_clip reads them)."""
    try:
        load_clip(text)
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_file(suffixes: set[str], what: str) -> Callable[[str], str]:
    """An argparse type for a file to write: its suffix is one of `suffixes` and its folder exists or can be made,
    checked before any work is done (a typo in --out should not cost the minutes of drawing before it)."""
    def parse(text: str) -> str:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r} needs the suffix of {what}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder, not a file name")
        folder = path.parent
        while not folder.exists():   # the nearest folder that exists decides whether the rest can be made
            folder = folder.parent
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: no permission to write in {folder}")
        return text
    return parse


def image_suffixes() -> set[str]:
    """The suffixes PIL can save to (.png, .jpg, .gif, .webp, ...)."""
    Image.init()
    return {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
