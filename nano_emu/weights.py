"""Reading released checkpoints, and strict loading: one home for every family.

A family's file (emu3.py, llamagen.py) holds only what is particular to it: a literal name map from the released
names to ours, the config translation and the prompt conventions. Everything else is here and shared:

- `open_checkpoint(path)`: a safetensors file, a folder of shards (with or without model.safetensors.index.json) or
  a `torch.save` file (read with `weights_only=True`, so no pickled code ever runs, and memory-mapped). It returns
  the names and shapes of every tensor before any tensor data is read, and reads tensors only when asked,
  cast to the target dtype one at a time.
- `rename(key, name_map)`: maps a key through a `{}`-template name map. A map is a dict of module paths with every
  numeric index written as `{}` (or spelled out, as in LlamaGen's VQ map); a checkpoint key matches the longest such
  path that is a prefix of it, the indices are carried over in order, and the rest of the key (`weight`, `bias`,
  ...) is kept. `rename_or_keep` leaves an unmapped key as it is, so the strict check reports it.
- `llama_config_fields(config, ...)`: the Llama fields of a transformers-style config.json -> GPTConfig fields.
- `load_strict(module, checkpoint, convert, ...)`: `convert` turns checkpoint tensors into the module's names
  (renames, fused-weight splits, permutations). It runs first on `meta` tensors of the checkpoint's shapes, so
  every missing, unexpected or misshapen key is reported in one error before a byte of weights is read; then it
  runs on the real tensors, which are assigned to a module built on the `meta` device.
"""

import argparse
import contextlib
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

# top-level keys under which training scripts nest the weights (LlamaGen's DDP checkpoints use "model"; its sample
# scripts also accept "module" (DeepSpeed) and "state_dict"); FSDP checkpoints are the state dict itself
NESTED_STATE_DICT_KEYS = ("model", "module", "state_dict")
# how a legacy torch.save file (PyTorch < 1.6, _use_new_zipfile_serialization=False) begins: pickle protocol 2, then
# torch's magic number 0x1950a86a20f9469cfc6c pickled as a 10-byte long
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def rename(key: str, name_map: dict[str, str], source: str = "checkpoint") -> str:
    """Map one checkpoint key through a `{}`-template name map (see the module docstring)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # longest module path first
        literal = ".".join(parts[:n])   # an entry that spells its indices out (LlamaGen's VQ map) is taken as is
        if literal in name_map:
            return ".".join([name_map[literal]] + parts[n:])
        template = ".".join("{}" if p.isdigit() else p for p in parts[:n])
        if template in name_map:
            indices = [p for p in parts[:n] if p.isdigit()]
            return ".".join([name_map[template].format(*indices)] + parts[n:])
    raise ValueError(f"{source}: no entry in the name map for key {key!r}")


def rename_or_keep(key: str, name_map: dict[str, str]) -> str:
    """`rename`, but a key no entry maps keeps its name, so the strict check lists it as unexpected (all of the
    unmapped keys at once, not just the first)."""
    try:
        return rename(key, name_map)
    except ValueError:
        return key


# transformers' Llama-style config fields (Emu3's config.json and -hf text_config, ChameleonConfig) -> GPTConfig's
LLAMA_CONFIG_NAMES = {
    "vocab_size": "vocab_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head", "hidden_size": "dim", "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len",
}


def llama_config_fields(config: dict, source: str, family: str, extra_names: dict[str, str] | None = None) -> dict:
    """The GPTConfig fields a Llama-style config.json states (None and absent fields are left out, so the family's
    preset supplies the released value), with rope_theta. RoPE comes as rope_theta + rope_scaling null (Emu3's
    original config), + rope_scaling {"rope_type": "default"} (-hf conversions), or rope_parameters {"rope_theta",
    "rope_type"} (transformers 5); any scaling but the default is refused, since nano_emu's RoPE is the plain one."""
    names = LLAMA_CONFIG_NAMES | (extra_names or {})
    fields = {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None}
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: RoPE scaling {rope} is not supported ({family} uses plain RoPE)")
    theta = config.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = float(theta)
    return fields


# ---------------------------------------------------------------------------------------------------------------
# reading


def open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"cannot read {file}: {e}; the file is truncated or corrupt, download it again") from None


def safetensors_files(path: Path) -> dict[Path, list[str] | None]:
    """file -> the keys it should hold (None: whatever it holds) for a .safetensors file or a folder of them."""
    if not path.is_dir():
        return {path: None}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index with a 'weight_map': {e!r}") from None
        files = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names the shard {file.name}, which is missing from {path} "
                                        f"(an incomplete download?)")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights in {path}: expected model.safetensors.index.json with its shards, "
                                f"or .safetensors files")
    return dict.fromkeys(files)


def allowing(cls: type):
    """The weights-only unpickler's allow-list with `cls` on it, for the `with` block (torch >= 2.5); torch 2.4 has
    only the process-wide list."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([cls])
    torch.serialization.add_safe_globals([cls])
    return contextlib.nullcontext()


def read_torch_file(path: Path) -> dict[str, Tensor]:
    """A `torch.save` checkpoint -> its state dict of (memory-mapped, not yet read) tensors. weights_only=True:
    only tensors and plain containers are unpickled, never code, with one class more allowed: argparse.Namespace,
    the `args` entry that training scripts (LlamaGen's, Lumina's) save beside {"model", "optimizer", "steps"}
    (unpickling a Namespace only fills its __dict__; nothing runs). A {"model": state_dict} is unwrapped, so the
    optimizer state is never read. A legacy (PyTorch < 1.6, non-zip) file is read whole, since it cannot be mmap'd."""
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_MAGIC))
    legacy = head == LEGACY_TORCH_MAGIC
    if not legacy and not zipfile.is_zipfile(path):   # torch.save writes a zip archive whose directory is at the end
        raise ValueError(f"cannot read {path}: not a torch.save zip archive nor a .safetensors file; the file is "
                         f"truncated or corrupt (download it again), or it is not a checkpoint")
    try:
        with allowing(argparse.Namespace):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, struct.error) as e:   # (a cut pickle)
        lines = str(e).splitlines()
        refused = next((line.strip() for line in lines if "Unsupported global" in line), None)
        what = "legacy (non-zip) torch.save file" if legacy else "weights-only PyTorch checkpoint"
        if refused:   # PyTorch's own line names the class, e.g. "GLOBAL mymodule.Config was not an allowed global"
            raise ValueError(f"cannot read {path} as a {what}: it holds Python objects besides tensors, which "
                             f"nano_emu never unpickles ({refused.split('. Please use')[0]})") from None
        raise ValueError(f"cannot read {path} as a {what} (it is truncated or corrupt, or it holds more than "
                         f"tensors): {lines[0] if lines else type(e).__name__}") from None
    if isinstance(obj, dict):
        for nested in NESTED_STATE_DICT_KEYS:
            if isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        what = f"a dict with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} holds {what}, not a state dict (name -> tensor), nor one under "
                         f"{' / '.join(map(repr, NESTED_STATE_DICT_KEYS))}")
    return obj


class Checkpoint:
    """The tensors of a checkpoint: `shapes` (name -> shape) is known as soon as it is opened, `read` loads tensors.
    safetensors: headers only until `read`; torch.save files: memory-mapped, so data is paged in only when read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        self.shapes, self._where = {}, {}   # name -> shape; name -> safetensors file or mmap'd tensor
        if self.path.is_dir() or self.path.suffix == ".safetensors":
            for file, keys in safetensors_files(self.path).items():
                with open_safetensors(file) as shard:
                    absent = sorted(set(keys or ()) - set(shard.keys()))
                    if absent:
                        raise ValueError(f"model.safetensors.index.json places {absent[:5]} in {file.name}, which "
                                         f"does not hold them")
                    for key in keys or shard.keys():
                        self.shapes[key], self._where[key] = tuple(shard.get_slice(key).get_shape()), file
        else:
            for key, tensor in read_torch_file(self.path).items():
                self.shapes[key], self._where[key] = tuple(tensor.shape), tensor

    def read(self, keys, device="cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The tensors `keys`, each floating one cast to `dtype` and moved to `device` as soon as it is read, so at
        most one tensor in the checkpoint's dtype is alive beside the result."""
        def place(tensor):
            return tensor.to(device, dtype if dtype and tensor.is_floating_point() else tensor.dtype)

        tensors, by_file = {}, {}
        for key in keys:
            where = self._where[key]
            if torch.is_tensor(where):
                tensors[key] = place(where)
            else:
                by_file.setdefault(where, []).append(key)
        for file, names in by_file.items():
            with open_safetensors(file) as shard:
                for key in names:
                    tensors[key] = place(shard.get_tensor(key))
        return tensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------
# strict loading


def check_state_dict(module: nn.Module, shapes: dict[str, tuple[int, ...]], source: str, keys=None) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and shape mismatches between `shapes` (key -> shape,
    e.g. read from checkpoint headers before any tensor is) and the module's state dict, or only its `keys` where
    given (a LoRA run's checkpoint holds the adapters alone)."""
    expected = module.state_dict()
    if keys is not None:
        expected = {k: expected[k] for k in keys}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    mismatched = [f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & shapes.keys()) if tuple(shapes[k]) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"cannot load {source} into {type(module).__name__}:"]
        problems = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
        for title, items in problems.items():
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:10]) + more)
        raise ValueError("\n".join(lines))


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str, assign: bool = False) -> None:
    """Check every name and shape first (check_state_dict); only then load. assign=True lets a module built on the
    meta device take (mmap'd) tensors as is."""
    check_state_dict(module, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    module.load_state_dict(state_dict, strict=True, assign=assign)


Convert = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def check_strict(module: nn.Module, checkpoint: Checkpoint, keys, convert: Convert, source: str) -> None:
    """Run `convert` on meta tensors of the checkpoint's shapes and check the result against the module: every
    name and shape is verified and nothing is read."""
    meta = {k: torch.empty(checkpoint.shapes[k], device="meta") for k in keys}
    check_state_dict(module, {k: tuple(v.shape) for k, v in convert(meta).items()}, source)


def load_strict(module: nn.Module, checkpoint: Checkpoint, convert: Convert, source: str, keys=None,
                device="cpu", dtype: torch.dtype | None = None) -> None:
    """The one strict-loading routine of every family: check (on meta tensors), then read `keys` (default: all),
    convert and assign. `convert` receives and returns name -> tensor; unknown names should pass through unchanged
    so that they are reported as unexpected keys, all at once."""
    keys = list(checkpoint.shapes if keys is None else keys)
    check_strict(module, checkpoint, keys, convert, source)
    load_state_dict_strict(module, convert(checkpoint.read(keys, device, dtype)), source, assign=True)


def read_json(path: Path, what: str) -> dict:
    """A checkpoint folder's JSON file (config.json, params.json), or an error that names the file and the folder."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {path.parent} is not a {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
