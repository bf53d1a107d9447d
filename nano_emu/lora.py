"""Small trainable deltas on a frozen GPT: LoRA, and the image-token rows of the output head. Merged back exactly.

LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen projection W (out, in) gets a low-rank update,
    y = x W^T + (alpha / r) * dropout(x) A^T B^T,    A (r, in) Kaiming-uniform, B (out, r) zeros,
so the model starts as the base, and only A and B train (r (in + out) numbers per projection instead of
in * out). `LoRALinear` keeps the base weight under its own name (`q_proj.weight`), so the GPT's state dict and
every name map stay as they are; the adapter adds `q_proj.lora_A.weight` and `q_proj.lora_B.weight`, the names
peft gives them. The adapter is kept in float32 while the base may be bf16 (peft does the same): the small part
that trains has full-precision weights, the frozen part costs half.

`RowDelta` is the other way to train little: Anole (GAIR-NLP/anole, issues #3 #8) made Chameleon draw by training
only the rows of the output head that score the 8192 image tokens; full fine-tuning "didn't really work". The
rows [start, stop) of the head's weight get a trainable float32 delta, starting at zero.

Both merge exactly into the base weight (`merge`, in float32 then cast to the weight's dtype) and unmerge to the
very tensor they started from (`unmerge` puts the original back; it does not subtract). `merged_state` gives the
state dict of the plain GPT with every delta folded in, which is what the release writers save.

peft's adapter format (`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A
.weight`) is written and read here; which <module> a nano_emu path is in a released model is release.py's name map.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# the projections of a decoder block (gpt.py's names, which are Llama's and Emu3's); "lm_head" may be added
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
BASE_KEY = "nano_emu_base"   # in adapter_model.safetensors' metadata: the base model's fingerprint (peft ignores it)


class AdapterMismatch(ValueError):
    """An adapter that does not belong to this base model (other shapes, other modules, another base)."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer (the width of the update B A), got {self.rank}: "
                             f"rank 0 would train nothing")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be > 0 (the update is scaled by alpha / rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS) - {"lm_head"})
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be some of {', '.join(PROJECTIONS)}, lm_head; got "
                             f"{', '.join(unknown) or 'none'}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def folded(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """weight + update, added in float32 and cast back to the weight's dtype: how every delta is merged."""
    return (weight.float() + update.to(weight.device)).to(weight.dtype)


class Delta(nn.Module):
    """What the two kinds of update share: a frozen `weight`, the update as a weight (`delta`), and merging it in
    exactly (the original tensor is kept, so unmerge puts it back bit for bit)."""

    weight: torch.Tensor
    original: torch.Tensor | None

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.original is None:
            self.original = self.weight.data
            self.weight.data = folded(self.original, self.delta())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.original is not None:
            self.weight.data, self.original = self.original, None


class LoRALinear(Delta):
    """A frozen bias-free Linear (its `weight` is the base's own Parameter) plus a LoRA update. See the docstring."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps the GPT's bias-free projections")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():   # peft's init: A as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B = 0
            bound = 1 / math.sqrt(self.in_features)
            self.lora_A.weight.copy_(torch.rand(self.lora_A.weight.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.weight.zero_()
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.original = None   # while merged: the base weight as it was, so unmerge is exact

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.original is not None:   # merged: the update is in the weight
            return y
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return y + (self.scaling * update).to(y.dtype)

    def delta(self, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """The update as a weight, (out, in) in float32: scaling * B @ A (of these tensors, or the module's)."""
        a = self.lora_A.weight if lora_A is None else lora_A
        b = self.lora_B.weight if lora_B is None else lora_B
        return self.scaling * (b.float() @ a.float())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.out_features}, scaling={self.scaling:g}"


class RowDelta(Delta):
    """A frozen bias-free Linear whose output rows [start, stop) train: weight[start:stop] + delta (Anole)."""

    def __init__(self, base: nn.Linear, start: int, stop: int):
        super().__init__()
        if not 0 <= start < stop <= base.out_features or base.bias is not None:
            raise ValueError(f"rows [{start}, {stop}) of a bias-free Linear with {base.out_features} outputs")
        self.in_features, self.out_features, self.start, self.stop = base.in_features, base.out_features, start, stop
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rows = nn.Parameter(torch.zeros(stop - start, self.in_features, device=base.weight.device))
        self.original = None

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.original is not None:
            return y
        update = F.linear(x.to(self.rows.dtype), self.rows).to(y.dtype)              # (..., stop - start)
        return torch.cat([y[..., :self.start], y[..., self.start:self.stop] + update, y[..., self.stop:]], dim=-1)

    def delta(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The update as a weight, (out, in) in float32: the trained rows, zeros elsewhere."""
        rows = self.rows if rows is None else rows
        full = torch.zeros(self.out_features, self.in_features, device=rows.device)
        full[self.start:self.stop] = rows.float()
        return full


DELTAS = (LoRALinear, RowDelta)   # every Delta that an adapter can hold


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(gpt: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze the GPT and wrap every projection named in config.targets in a LoRALinear (A drawn from `seed`).
    Returns the wrapped module paths, e.g. ["layers.0.self_attn.q_proj", ...]."""
    freeze(gpt)
    generator = torch.Generator().manual_seed(seed)
    paths = [path for path, module in gpt.named_modules()
             if path.rpartition(".")[2] in config.targets and isinstance(module, nn.Linear)]
    for path in paths:
        _replace(gpt, path, LoRALinear(gpt.get_submodule(path), config.rank, config.scaling, config.dropout,
                                       generator))
    return paths


def add_row_delta(gpt: nn.Module, start: int, stop: int) -> None:
    """Freeze the GPT; only the output head's rows [start, stop) train (RowDelta)."""
    freeze(gpt)
    _replace(gpt, "lm_head", RowDelta(gpt.lm_head, start, stop))


def deltas(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, DELTAS)}


def merge(model: nn.Module) -> None:
    for module in deltas(model).values():
        module.merge()


def unmerge(model: nn.Module) -> None:
    for module in deltas(model).values():
        module.unmerge()


def unload(model: nn.Module) -> None:
    """Fold every delta into its weight and put plain nn.Linear modules back (peft's merge_and_unload): the model
    is then a plain GPT again, with nothing left of the adapters."""
    for path, module in deltas(model).items():
        module.merge()
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(module.weight.data, requires_grad=False)
        _replace(model, path, plain)


def merged_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain model, every delta folded into its weight, the model left as it is. `state`
    is the model's state dict as whole tensors (under FSDP, the gathered one); default model.state_dict()."""
    state = dict(model.state_dict() if state is None else state)
    for path, module in deltas(model).items():
        if isinstance(module, LoRALinear):
            update = module.delta(state.pop(f"{path}.lora_A.weight"), state.pop(f"{path}.lora_B.weight"))
        else:
            update = module.delta(state.pop(f"{path}.rows"))
        if module.original is None:   # (merged in place, the state already holds base + delta)
            state[f"{path}.weight"] = folded(state[f"{path}.weight"], update)
    return state


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# ---------------------------------------------------------------------------------------------------------------
# peft's adapter format


@dataclass
class Adapter:
    """An adapter as peft stores it: released module path -> (A (r, in), B (out, r)), with its LoRA numbers.
    rank and alpha may differ per module (peft's rank_pattern / alpha_pattern: LlamaGen's fused wqkv)."""
    config: LoRAConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    target_modules: str                              # a regex peft full-matches against module names
    base_name: str = ""                              # peft's base_model_name_or_path
    base_fingerprint: str = ""                       # release.fingerprint of the base it was trained on
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def save_adapter(adapter: Adapter, folder: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes them; each file is
    written to a .tmp beside it and renamed, so a kill leaves the previous file or none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "r": adapter.config.rank,
              "lora_alpha": adapter.config.alpha, "lora_dropout": adapter.config.dropout,
              "target_modules": adapter.target_modules, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "rank_pattern": adapter.rank_pattern, "alpha_pattern": adapter.alpha_pattern,
              "base_model_name_or_path": adapter.base_name or None, "revision": None}
    tensors = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    weights_tmp, config_tmp = folder / "adapter_model.safetensors.tmp", folder / "adapter_config.json.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", BASE_KEY: adapter.base_fingerprint})
    config_tmp.write_text(json.dumps(config, indent=2))
    os.replace(weights_tmp, folder / "adapter_model.safetensors")
    os.replace(config_tmp, folder / "adapter_config.json")


def read_adapter(folder: str | Path) -> Adapter:
    """An adapter folder (ours or peft's) -> Adapter. Refuses what is not a LoRA adapter, in one message."""
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: an adapter folder holds adapter_config.json and "
                                    f"adapter_model.safetensors (peft's format)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file} describes a {config.get('peft_type')!r} adapter; nano_emu reads LoRA ones")
    if config.get("use_dora") or config.get("use_rslora") or config.get("fan_in_fan_out") or \
            config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{config_file}: DoRA, rsLoRA, fan_in_fan_out, biases and modules_to_save are not LoRA as "
                         f"nano_emu applies it")
    weights: dict[str, list] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        fingerprint = (f.metadata() or {}).get(BASE_KEY, "")
        for key in f.keys():
            module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
                raise ValueError(f"{weights_file}: key {key!r} is not {PEFT_PREFIX}<module>.lora_A/B.weight")
            weights.setdefault(module, [None, None])[part[0] == "B"] = f.get_tensor(key)
    unpaired = sorted(m for m, (a, b) in weights.items() if a is None or b is None)
    if unpaired:
        raise ValueError(f"{weights_file}: {unpaired[0]} has lora_A without lora_B or the reverse")
    targets = config.get("target_modules")
    lora = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0))
    return Adapter(lora, {m: (a, b) for m, (a, b) in weights.items()},
                   targets if isinstance(targets, str) else "|".join(targets or []),
                   config.get("base_model_name_or_path") or "", fingerprint,
                   config.get("rank_pattern") or {}, config.get("alpha_pattern") or {})


def attach(gpt: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], source: str,
           dropout: float = 0.0) -> None:
    """Wrap the GPT's modules named in `weights` (nano_emu path -> (A (r, in), B (out, r), scaling); r may differ
    per module) in LoRALinear and load them. Every module must exist and every shape fit, or one AdapterMismatch
    lists what does not, before anything is changed."""
    modules = dict(gpt.named_modules())
    problems = []
    for path, (a, b, _) in weights.items():
        module = modules.get(path)
        if not isinstance(module, nn.Linear):
            problems.append(f"{path}: no such projection in this model")
        elif a.shape[1] != module.in_features or b.shape != (module.out_features, a.shape[0]):
            problems.append(f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but the module maps "
                            f"{module.in_features} -> {module.out_features}")
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise AdapterMismatch(f"{source} does not fit this base model: " + "; ".join(problems[:5]) + more)
    for path, (a, b, scaling) in weights.items():
        wrapped = LoRALinear(modules[path], a.shape[0], scaling, dropout)
        with torch.no_grad():
            wrapped.lora_A.weight.copy_(a)
            wrapped.lora_B.weight.copy_(b)
        _replace(gpt, path, wrapped)


def module_scaling(adapter: Adapter, module: str) -> float:
    """alpha / r of one released module: peft's alpha_pattern (a key matches a module whose name ends with it, as
    a regex) over lora_alpha, divided by the module's own rank (rank_pattern shows in lora_A's shape)."""
    alpha = next((float(v) for k, v in adapter.alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", module)),
                 adapter.config.alpha)
    return alpha / adapter.weights[module][0].shape[0]
