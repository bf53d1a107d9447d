"""What the command-line scripts (sample.py, train_tiny.py, bench.py, demo.py) share: argparse types that refuse
nonsense up front, what --device auto means, and the Pipeline the model flags name (load_pipeline).

A flag the library would choke on deep inside (`--temperature -1` surfaced as "codes must lie in [0, 512)",
`--top-k 0` as a tensor size mismatch) is refused while parsing, in one line that names the flag and the rule:

    sample.py: error: argument --top-k: top_k must be an integer >= 1 (or None for off), got 0

Each type is a plain function of the flag's text, so argparse reports its ArgumentTypeError with the flag's name.
The sampling flags are checked by the library's own rule (`option_of`: sampler.Sampling / Guidance), so the
command line and the Python API refuse the same values. Only user mistakes are turned into one line and exit code
2 (argparse's); bugs keep their traceback.
"""

import argparse
import io
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .hub import parse_id
from .image import load_clip, load_image
from .pipeline import Pipeline
from .sampler import Guidance, Sampling


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is ONE line: argparse first prints the whole usage, which for a script
    with twenty flags buries the line that says what is wrong. Exit code 2, as argparse's. --help keeps the
    description's own line breaks (its examples) and gives each flag one line where it fits."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class",
                          lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30))
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type, text: str) -> int | float:
    """The text as `kind` (int or float), or argparse's error saying which was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def checked(kind: type, ok: Callable, rule: str) -> Callable[[str], int | float]:
    """An argparse type: the text as `kind` (int or float, finite), refused unless ok(value); `rule` says why."""
    def parse(text: str):
        value = number(kind, text)
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def at_least(low: int | float, kind: type = int, note: str = "") -> Callable[[str], int | float]:
    return checked(kind, lambda value: value >= low, f">= {low}" + (f" ({note})" if note else ""))


def above(low: int | float, kind: type = float, note: str = "") -> Callable[[str], int | float]:
    return checked(kind, lambda value: value > low, f"> {low}" + (f" ({note})" if note else ""))


def option_of(options: type, name: str, kind: type, ok: Callable | None = None, rule: str = "") -> Callable:
    """An argparse type for a sampling option: the text as `kind`, checked by `options(**{name: value})`
    (sampler.Sampling or Guidance, whose checks the Python API runs), and by ok(value) where the command line is
    stricter than the API (`rule` says why)."""
    def parse(text: str):
        value = number(kind, text)
        try:
            options(**{name: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if ok is not None and not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


temperature = option_of(Sampling, "temperature", float)       # >= 0, finite; 0 = greedy
top_k = option_of(Sampling, "top_k", int)                     # >= 1
top_p = option_of(Sampling, "top_p", float)                   # (0, 1]
cdk_k = option_of(Guidance, "cdk_k", int)                     # >= 1
# the API takes any finite scale (0 draws the negative prompt, < 0 steers away from the prompt); a user typing
# --cfg 0 has made a mistake far more often than an experiment
cfg_scale = option_of(Guidance, "cfg_scale", float, lambda g: g > 0,
                      "> 0 (1 = no guidance, more follows the prompt harder; 0 would ignore the prompt)")


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, e.g. "1,1,2,4" (a VQ's width multipliers, one per level)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be two or more positive integers with commas, e.g. 1,2,2,4, "
                                         f"got {text!r}")
    return values


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


def load_pipeline(args) -> Pipeline:
    """The Pipeline the model flags name, as sample.py and demo.py take them: --ckpt (a tiny run folder),
    --chameleon [--tokenizer-dir] (Chameleon / Anole), --llamagen with --vq (LlamaGen c2i), else --weights [--vq]
    (Emu3); on --device, in --dtype (auto: float32 for tiny and LlamaGen, bfloat16 as Emu3 and Chameleon are
    released and demoed). The released ones take folders or Hugging Face Hub ids (hub.py)."""
    from .tiny import load_tiny
    device = resolve_device(args.device)

    def dtype(auto: torch.dtype) -> torch.dtype:
        return auto if args.dtype == "auto" else getattr(torch, args.dtype)

    if args.ckpt:
        return load_tiny(args.ckpt, device=device, dtype=dtype(torch.float32))
    start = time.time()
    if args.llamagen:
        from .llamagen import load_llamagen
        pipe = load_llamagen(args.llamagen, args.vq, gpt_model=args.gpt_model, image_size=args.image_size,
                             device=device, dtype=dtype(torch.float32))
        print(f"loaded a {pipe.gpt.num_params() / 1e6:.1f}M-parameter GPT and a {pipe.vq.cfg.spatial_factor}x VQ "
              f"in {time.time() - start:.1f}s")
        return pipe
    if args.chameleon:
        from .chameleon import load_chameleon
        pipe = load_chameleon(args.chameleon, tokenizer_dir=args.tokenizer_dir, device=device,
                              dtype=dtype(torch.bfloat16), image_size=args.image_size or 512)
        print(f"  {pipe.gpt.num_params() / 1e9:.2f}B-parameter Chameleon loaded in {time.time() - start:.1f}s")
        return pipe
    from .emu3 import load_emu3
    print(f"loading {args.weights}" + (f" + {args.vq}" if args.vq else "") + f" as {dtype(torch.bfloat16)} on "
          f"{device} ...")
    pipe = load_emu3(args.weights, vq_path=args.vq, device=device, dtype=dtype(torch.bfloat16))
    print(f"  {pipe.gpt.num_params() / 1e9:.2f}B-parameter GPT loaded in {time.time() - start:.1f}s")
    return pipe


def device(text: str) -> str:
    """--device: auto, or a device this PyTorch build has (checked here: torch would fail at the first tensor, after
    the checkpoint loads, with "Torch not compiled with CUDA enabled" or a list of every device type it knows)."""
    if text == "auto":
        return text
    try:
        name = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: auto, cpu, cuda, cuda:N or mps") from None
    if name.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if name.index is not None and name.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA device(s), "
                                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif name.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: Apple's MPS is not available on this machine or build")
    elif name.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: nano_emu runs on cpu, cuda or mps")
    return text


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


def output_file(suffixes: set[str], what: str, probe: Callable[[Path], str | None] | None = None
                ) -> Callable[[str], str]:
    """An argparse type for a file to write: its suffix is one of `suffixes`, probe(path) (optional) finds nothing
    wrong with it, and its folder exists or can be made, all checked before any work is done (a typo in --out should
    not cost the minutes of drawing before it)."""
    def parse(text: str) -> str:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r} needs the suffix of {what}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder, not a file name")
        problem = probe(path) if probe is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        _writable(text, path.parent)
        return text
    return parse


def output_folder(text: str) -> str:
    """An argparse type for a folder to write into (train_tiny.py --out): a folder, or a path one can be made at."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _writable(text, path)
    return text


def _writable(text: str, folder: Path) -> None:
    while not folder.exists():   # the nearest folder that exists decides whether the rest can be made
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no permission to write in {folder}")


def image_suffixes() -> set[str]:
    """The suffixes PIL can save to (.png, .jpg, .gif, .webp, ...)."""
    Image.init()
    return {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def writes_rgb(path: Path) -> str | None:
    """What is wrong with saving an RGB image as `path`'s format, or None: some formats PIL lists as writable take
    other modes only (XBM: 1-bit) or are stubs without a writer (HDF5, BUFR, GRIB)."""
    fmt = Image.registered_extensions()[path.suffix.lower()]
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception as e:   # each plugin fails its own way: OSError, KeyError, ValueError, ...
        return f"cannot write {path}: PIL does not write RGB images as {fmt} ({e}); use .png or .jpg"
    return None
