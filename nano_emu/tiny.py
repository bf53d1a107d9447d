"""The tiny family: the toy checkpoints train_tiny.py writes, as emu3.py / llamagen.py / chameleon.py are for the
released ones.

A tiny run's folder holds `vq.safetensors` and `gpt.safetensors` (checkpoint.py: weights + a JSON metadata
string with the config, the layout, the caption tokenizer and the sampling defaults). Its presets are the same
modules' (`VQConfig.tiny()`, `GPTConfig.tiny()`, `Layout.tiny()`); this file holds what is particular to it:

- the caption tokenizer and how a checkpoint names it (`make_tokenizer` writes the spec, `tokenizer_from_spec`
  reads it back): whole words for the toy worlds' small languages, or UTF-8 bytes;
- the prompt conventions (`tiny_pipeline`): square images of `image_size` pixels taken as they are (other ratios
  are refused: the toys never saw them), no prompt suffix, the empty caption as CFG's unconditional branch, and the
  sampling its checkpoint records (recipe.SAMPLING chose it when the run was trained);
- `load_tiny(folder)`, the loader sample.py and the notebooks call.

    pipe = load_tiny("out/tiny")
    pipe.draw(["a red circle in the top left"], seed=0)[0]
"""

from pathlib import Path

import torch

from .checkpoint import check_same_vq, load_checkpoint, weights_hash
from .gpt import GPT, GPTConfig
from .layout import Layout
from .pipeline import Pipeline
from .sampler import Guidance, Sampling
from .tokenizer import ByteTokenizer, WordTokenizer
from .vq import VQConfig, VQModel
from .weights import load_state_dict_strict

def make_tokenizer(kind: str, words: list[str] | None = None):
    """The caption tokenizer of a tiny run and the spec its checkpoint stores: "bytes" (UTF-8 bytes), or
    "words" with the world's whole vocabulary (tokenizer.WordTokenizer)."""
    if kind == "bytes":
        return ByteTokenizer(), "bytes"
    if kind != "words" or not words:
        raise ValueError(f"a tiny tokenizer is 'bytes', or 'words' with a vocabulary; got {kind!r}")
    return WordTokenizer(words), {"words": list(words)}


# a word vocabulary larger than this is left to bytes: most of its words would be seen a handful of times, and every
# new word at sampling time would be refused
WORD_LIMIT = 1024


def choose_tokenizer(kind: str, worlds) -> tuple:
    """The caption tokenizer for a run's worlds: kind "words", "bytes" or "auto" (words when the language is
    closed -- the toy worlds list theirs -- or when the captions use at most WORD_LIMIT pieces; bytes otherwise).
    A word vocabulary is built from the world's captions, plus the meta text's digits and "*"."""
    listed = [world.words() for world in worlds]
    if all(words is not None for words in listed):
        vocab = list(dict.fromkeys(w for words in listed for w in words))
    else:
        seen = dict.fromkeys(p for world in worlds for text in world.texts() for p in WordTokenizer.split(text))
        vocab = list(dict.fromkeys([*seen, *"0123456789*"]))
    if kind == "auto":
        kind = "words" if len(vocab) <= WORD_LIMIT else "bytes"
    return make_tokenizer(kind, vocab)


def describe_tokenizer(spec) -> str:
    return "UTF-8 bytes (256 ids)" if spec == "bytes" else f"whole words ({len(spec['words'])}-piece vocabulary)"


def tokenizer_from_spec(spec) -> ByteTokenizer | WordTokenizer:
    """The text tokenizer a tiny checkpoint names in its metadata: "bytes", or {"words": [...]}."""
    if spec == "bytes":
        return ByteTokenizer()
    if isinstance(spec, dict) and "words" in spec:
        return WordTokenizer(spec["words"])
    raise ValueError(f"unknown tiny tokenizer {spec!r} in the checkpoint's metadata (expected 'bytes' or "
                     f"{{'words': [...]}})")


def tiny_pipeline(gpt: GPT, vq: VQModel, tokenizer, layout: Layout, image_size: int,
                  sampling: dict | None = None) -> Pipeline:
    """The toy models as train_tiny.py trains them (in memory, or read back by load_tiny): square images of
    image_size pixels taken as they are, no prompt conventions. sampling: {"cfg_scale": .., "temperature": ..,
    "top_k": ..} as the checkpoint records them; an entry left out takes Guidance's / Sampling's own default
    (unguided, temperature 1)."""
    given = {k: v for k, v in (sampling or {}).items() if v is not None}
    side = image_size
    return Pipeline(gpt, vq, tokenizer, layout, image_area=side * side,
                    resize=dict(min_pixels=side * side, max_pixels=side * side), max_aspect_ratio=1.0,
                    guidance=Guidance(cfg_scale=given.pop("cfg_scale")) if "cfg_scale" in given else Guidance(),
                    sampling=Sampling(**given))


def load_tiny(folder: str | Path, device="cpu", dtype=torch.float32) -> Pipeline:
    """The checkpoints train_tiny.py writes: vq.safetensors and gpt.safetensors (weights + JSON config), which must
    come from one run: the GPT records the hash of the VQ it was trained on (checkpoint.check_same_vq)."""
    folder = Path(folder)
    vq_path, gpt_path = folder / "vq.safetensors", folder / "gpt.safetensors"
    for path in (vq_path, gpt_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: point --ckpt at the --out folder of a finished "
                                    f"train_tiny.py run (it writes vq.safetensors and gpt.safetensors)")
    vq_state, vq_meta, _ = load_checkpoint(vq_path)
    gpt_state, gpt_meta, _ = load_checkpoint(gpt_path)
    vq = VQModel(_config(VQConfig, "vq", vq_path, vq_meta, gpt_path))
    load_state_dict_strict(vq, vq_state, source=str(vq_path))
    note = check_same_vq(gpt_meta, weights_hash(vq_state), gpt_path, vq_path)
    if note:
        print(note)
    if gpt_meta.get("step") != gpt_meta.get("steps"):
        print(f"note: {gpt_path} is a mid-training checkpoint (step {gpt_meta.get('step')} of "
              f"{gpt_meta.get('steps')})")
    gpt = GPT(_config(GPTConfig, "gpt", gpt_path, gpt_meta, vq_path))
    load_state_dict_strict(gpt, gpt_state, source=str(gpt_path))
    for key in ("tokenizer", "layout"):
        if key not in gpt_meta:
            raise ValueError(f"{gpt_path}: its metadata has no {key!r} entry (it has {', '.join(gpt_meta)}): not a "
                             f"GPT checkpoint as train_tiny.py writes them")
    if "sampling" not in gpt_meta:
        print(f"note: {gpt_path} records no sampling defaults (written before runs saved them): drawing unguided at "
              f"temperature 1 unless told (--cfg, --temperature)")
    return tiny_pipeline(gpt.to(device, dtype).eval(), vq.to(device).eval(), tokenizer_from_spec(gpt_meta["tokenizer"]),
                         Layout(**gpt_meta["layout"]), image_size=gpt_meta.get("image_size", 64),
                         sampling=gpt_meta.get("sampling"))


def _config(kind: type, name: str, path: Path, meta: dict, other: Path):
    """The VQConfig / GPTConfig a checkpoint's metadata holds, or a ValueError that says what the file is instead."""
    if meta.get("kind", name) != name:
        swapped = " (the two files look swapped)" if meta.get("kind") in ("vq", "gpt") else ""
        raise ValueError(f"{path} holds a {meta['kind']!r} checkpoint, not the {name.upper()}{swapped}: "
                         f"{path.name} and {other.name} of one run are what --ckpt reads")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: its metadata has no 'config' entry (it has {', '.join(meta) or 'nothing'}): not "
                         f"a {name.upper()} checkpoint as train_tiny.py writes them")
    try:
        return kind(**meta["config"])
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{path}: its 'config' is not a {kind.__name__} ({e})") from None
