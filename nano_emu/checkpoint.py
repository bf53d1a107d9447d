"""Checkpoints for the models we train: one safetensors file per model, written atomically; and what keeps two
runs, or two halves of a run, from mixing.

A checkpoint is a single `.safetensors` file holding the weights (`model.*`), the optimizer's tensors
(`optim.*`, so training resumes exactly), any other training state (`extra.*`, e.g. the VQ's code-usage counters)
and a JSON metadata string (config, step, metrics, the optimizer's scalars). One file means one atomic write: it
goes to `<name>.tmp` and is renamed over the old file with os.replace, so a crash or Ctrl-C mid-write leaves the
previous checkpoint intact, never a torn one. Nothing is ever unpickled: safetensors stores raw tensors and the
metadata is plain JSON.

Three guards for the files of a run (train_tiny.py's --out folder):
- `weights_hash`: a fingerprint of a state dict. A GPT trained on a VQ's codes records the VQ's hash in its
  metadata (`VQ_HASH_KEY`); `check_same_vq` refuses a GPT file next to another run's VQ, which would load and
  sample noise (codes mean nothing to a GPT trained on another codebook).
- `output_lock(folder)`: one training run per folder. A second run is refused with the holder's pid; a lock left by
  a run that died (kill -9, a power cut) is taken over, and the `.tmp` files its killed writes left are removed.
- `check_resume`: --resume continues the run the folder holds, so the settings it is asked for must be the ones
  stored with the checkpoints; a difference is refused by flag name unless the caller allows that flag.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

try:
    import fcntl   # POSIX; the kernel drops a flock when its holder dies, however it dies
except ImportError:   # Windows: no lock (see output_lock)
    fcntl = None

VQ_HASH_KEY = "vq_hash"          # in a GPT's metadata: weights_hash of the VQ whose codes it was trained on
SETTINGS_KEY = "settings"        # in a training checkpoint's metadata: the run's flags, as check_resume compares them
LOCK_NAME = ".lock"              # in a run's output folder, while a run writes there: the holder's pid


def save_checkpoint(path, model: dict[str, torch.Tensor], meta: dict, optimizer: dict | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write model weights, JSON-able `meta`, an optional optimizer.state_dict() and optional `extra` tensors
    (training state that is neither; read back with load_extra) to `path`, atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.items()}
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    optim_meta = None
    if optimizer is not None:
        # tensors (exp_avg, ...) go in the file; scalars (step counts stored as Python numbers, hyperparameters)
        # and the param-group layout go in the metadata
        optim_meta = {"param_groups": optimizer["param_groups"], "scalars": {}}
        for param_id, state in optimizer["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{param_id}.{key}"] = value.detach().contiguous().cpu()
                else:
                    optim_meta["scalars"][f"{param_id}.{key}"] = value
    header = {"nano_emu": json.dumps({**meta, "optimizer": optim_meta})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)   # atomic on POSIX and Windows: readers see the old file or the new one


def _read(path: Path, device, wanted: Callable[[str], bool]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(the file's nano_emu metadata string, its tensors whose names pass `wanted`), or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return (f.metadata() or {}).get("nano_emu"), {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def _parse_meta(path: Path, header: str | None) -> dict:
    if header is None:
        raise ValueError(f"{path} has no nano_emu metadata: not a checkpoint written by nano_emu")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its nano_emu metadata is not valid JSON ({e}); the file was edited or "
                         f"damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its nano_emu metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def read_meta(path) -> dict:
    """The JSON metadata of a checkpoint alone (no tensor is read), without the optimizer's part."""
    meta = _parse_meta(Path(path), _read(Path(path), "cpu", lambda name: False)[0])
    meta.pop("optimizer", None)
    return meta


def load_checkpoint(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """-> (model state_dict, meta, optimizer state_dict or None). Raises FileNotFoundError / ValueError
    naming the file when it is missing or not a nano_emu checkpoint."""
    path = Path(path)
    header, tensors = _read(path, device, lambda name: not name.startswith("extra."))
    meta = _parse_meta(path, header)
    optim_meta = meta.pop("optimizer", None)
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = None
    if optim_meta is not None:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                param_id, key = k.removeprefix("optim.").split(".", 1)
                state.setdefault(int(param_id), {})[key] = v
        for k, v in optim_meta["scalars"].items():
            param_id, key = k.split(".", 1)
            state.setdefault(int(param_id), {})[key] = v
        optimizer = {"state": state, "param_groups": optim_meta["param_groups"]}
    return model, meta, optimizer


def load_extra(path, device="cpu") -> dict[str, torch.Tensor]:
    """The `extra` tensors save_checkpoint wrote (empty for a checkpoint without any)."""
    _, tensors = _read(Path(path), device, lambda name: name.startswith("extra."))
    return {k.removeprefix("extra."): v for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# which VQ a GPT belongs to


class RunMismatch(ValueError):
    """Files, or settings, of two different runs: a GPT beside another run's VQ, --resume with other flags (or
    allowing a change of a flag that does not exist)."""


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: the same weights give the same hash
    on any device and in any run; one changed bit gives another. (The tiny VQ's 1 MB take a few milliseconds.)"""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())   # bytes: bfloat16 has no numpy dtype
    return digest.hexdigest()


def check_same_vq(gpt_meta: dict, vq_hash: str, gpt_path, vq_path) -> str | None:
    """Refuse (RunMismatch, naming both files) a GPT whose metadata records another VQ than the one of hash `vq_hash`.
    A GPT checkpoint written before the hash was recorded cannot be checked: returns a note saying so (else None)."""
    recorded = gpt_meta.get(VQ_HASH_KEY)
    if recorded is None:
        return (f"note: {gpt_path} predates the record of its VQ ({VQ_HASH_KEY}), so nothing checks that {vq_path} "
                f"is the VQ it was trained on; if it draws noise, the two files come from different runs")
    if recorded != vq_hash:
        raise RunMismatch(f"{gpt_path} was trained on another VQ than {vq_path} (VQ weights {recorded[:12]} there, "
                         f"{vq_hash[:12]} here): the two files come from different runs, and this GPT would read "
                         f"this VQ's codes as noise; use the vq.safetensors and gpt.safetensors of one run")
    return None


# ---------------------------------------------------------------------------------------------------------------
# one run per output folder


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class OutputLock:
    """The lock of a run's output folder: `folder/.lock`, held with flock(2) and holding the holder's pid.

    The kernel drops a flock when its holder's process ends, however it ends, so a lock file left by a killed run is
    free to take over: only a live holder blocks, and the pid in the file names it. The file is removed on release.
    On a system without fcntl (Windows) or a file system without locks nothing is locked, with a note saying so.
    Use `with output_lock(folder):` (or acquire/release)."""

    def __init__(self, folder):
        self.folder, self.path, self.fd = Path(folder), Path(folder) / LOCK_NAME, None

    def acquire(self) -> "OutputLock":
        if self.fd is not None:
            return self
        if fcntl is None:
            print(f"note: no file locks on this system (no fcntl), so nothing stops a second run in {self.folder}")
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:   # a live process holds it
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise FolderInUse(f"{self.folder} is in use by another training run (pid {holder or 'unknown'}, "
                                  f"lock file {self.path}): wait for it to end, or give another --out") from None
            except OSError as e:   # a file system without locks (some network mounts)
                os.close(fd)
                print(f"note: cannot lock {self.path} ({e.strerror}), so nothing stops a second run there")
                return self
            try:   # the file may have been released and removed between open and flock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        for stale in remove_stale_tmp(self.folder):
            print(f"note: removed {stale}, left by a write that was killed before it finished")
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)   # while still held: a waiting opener sees the inode change
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(folder) -> OutputLock:
    """`with output_lock(out):` -- one training run per output folder (OutputLock)."""
    return OutputLock(folder)


def remove_stale_tmp(folder) -> list[Path]:
    """Remove the `*.tmp` files in `folder` (what an atomic write killed mid-way leaves: save_checkpoint's, or
    image.save_image's). Call it only while no other process writes there, i.e. holding the folder's lock."""
    removed = []
    for tmp in sorted(Path(folder).glob("*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# --resume continues the same run


def settings_of(args) -> dict:
    """An argparse Namespace (or dict) of flags -> a JSON-able dict for SETTINGS_KEY (paths as text)."""
    values = vars(args) if not isinstance(args, dict) else args
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, bool):   # a store_true flag
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def check_resume(folder, asked: dict, names: Iterable[str] = ("vq.safetensors", "gpt.safetensors"),
                 ignore: Iterable[str] = (), allowed: Iterable[str] = (), hint: str = "") -> str:
    """Before --resume trains on: compare the settings stored with each checkpoint in `folder` (SETTINGS_KEY) with
    the `asked` ones (settings_of(args)). A flag that differs is refused, all of them in one RunMismatch that names
    each flag and both values, unless it is in `allowed` (a change the user asked for on purpose, e.g. more steps);
    flags in `ignore` are never compared (where the output goes, the device). Returns what to print: that the
    folder holds no checkpoint yet (the run starts fresh), or what is resumed, with the allowed changes. `hint`
    ends the refusal: how the user allows a change on purpose (the caller's flag for it)."""
    folder, asked, ignore, allowed = Path(folder), settings_of(asked), set(ignore), set(allowed)
    unknown = sorted(allowed - asked.keys())
    if unknown:
        raise RunMismatch(f"no flag {', '.join(map(_flag, unknown))} to allow a change of")
    found = [name for name in names if (folder / name).is_file()]
    if not found:
        return f"--resume: {folder} holds no checkpoint yet ({', '.join(names)}), so the run starts fresh"
    notes, refused = [], []
    for name in found:
        stored = read_meta(folder / name).get(SETTINGS_KEY)
        if stored is None:
            notes.append(f"{name} predates stored settings: nothing checks that this run asks for the same ones")
            continue
        for key in sorted((stored.keys() & asked.keys()) - ignore):
            old, new = stored[key], asked[key]
            if old == new:
                continue
            change = f"{_flag(key)} {_shown(old)} there, {_shown(new)} now"
            if key in allowed:
                notes.append(f"{name}: {change} (allowed)")
            elif change not in refused:
                refused.append(change)
    if refused:
        raise RunMismatch(f"--resume asks for other settings than the run in {folder} was trained with: "
                         f"{'; '.join(refused)}. Resume with the run's flags, or start a new run in another --out"
                         + (f"; {hint}" if hint else ""))
    return "; ".join([f"resuming the run in {folder} ({', '.join(found)})"] + notes)
