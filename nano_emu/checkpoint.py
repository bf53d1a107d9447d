"""Checkpoints for the models we train: one safetensors file per model, written atomically.

A checkpoint is a single `.safetensors` file holding the weights (`model.*`), the optimizer's tensors
(`optim.*`, so training resumes exactly) and a JSON metadata string (config, step, metrics, the optimizer's
scalars). One file means one atomic write: it goes to `<name>.tmp` and is renamed over the old file with
os.replace, so a crash or Ctrl-C mid-write leaves the previous checkpoint intact, never a torn one.
Nothing is ever unpickled: safetensors stores raw tensors and the metadata is plain JSON.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_checkpoint(path, model: dict[str, torch.Tensor], meta: dict, optimizer: dict | None = None) -> None:
    """Write model weights, JSON-able `meta` and an optional optimizer.state_dict() to `path`, atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.items()}
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


def load_checkpoint(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """-> (model state_dict, meta, optimizer state_dict or None). Raises FileNotFoundError / ValueError
    naming the file when it is missing or not a nano_emu checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = (f.metadata() or {}).get("nano_emu")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    if header is None:
        raise ValueError(f"{path} has no nano_emu metadata: not a checkpoint written by nano_emu")
    meta = json.loads(header)
    optim_meta = meta.pop("optimizer")
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
