"""Name maps and a strict loader for released checkpoints.

Each released layout gets an explicit, literal map from its module names to ours. A map is a dict of module paths
with every numeric index written as `{}`; a checkpoint key matches the longest such path that is a prefix of it, the
indices are carried over in order, and the rest of the key (`weight`, `bias`, `norm1.running_mean`, ...) is kept.
A key that no entry matches is an error, never silently dropped. `load_state_dict_strict` then checks every name
and shape before it touches the module, so a wrong checkpoint fails with one message that says what is wrong.

VQ: nano_emu.vq uses the original `BAAI/Emu3-VisionTokenizer` names, so that checkpoint loads as is; the
transformers port (`Emu3-*-hf`, keys under `vqmodel.`) renamed modules and turned the attention 1x1 convs into
Linear layers, which `vq_from_hf` undoes.
"""

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from nano_emu.vq import VQConfig, VQModel

# transformers / -hf VQ names (under `vqmodel.` in the -hf checkpoints) -> original Emu3-VisionTokenizer names
VQ_HF_TO_ORIGINAL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.down_block.down.{}.block.{}": "encoder.down.{}.block.{}",
    "encoder.down_block.down.{}.attn_norms.{}": "encoder.down.{}.attn.{}.norm",
    "encoder.down_block.down.{}.attn.{}.q_proj": "encoder.down.{}.attn.{}.q",
    "encoder.down_block.down.{}.attn.{}.k_proj": "encoder.down.{}.attn.{}.k",
    "encoder.down_block.down.{}.attn.{}.v_proj": "encoder.down.{}.attn.{}.v",
    "encoder.down_block.down.{}.attn.{}.out_proj": "encoder.down.{}.attn.{}.proj_out",
    "encoder.down_block.down.{}.downsample": "encoder.down.{}.downsample",
    "encoder.middle_block.block_1": "encoder.mid.block_1",
    "encoder.middle_block.attn_norm": "encoder.mid.attn_1.norm",
    "encoder.middle_block.attn_1.q_proj": "encoder.mid.attn_1.q",
    "encoder.middle_block.attn_1.k_proj": "encoder.mid.attn_1.k",
    "encoder.middle_block.attn_1.v_proj": "encoder.mid.attn_1.v",
    "encoder.middle_block.attn_1.out_proj": "encoder.mid.attn_1.proj_out",
    "encoder.middle_block.block_2": "encoder.mid.block_2",
    "encoder.norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.time_conv.{}": "encoder.time_conv.{}",
    "encoder.time_res_stack.{}": "encoder.time_res_stack.{}",
    "decoder.time_res_stack.{}": "decoder.time_res_stack.{}",
    "decoder.time_conv.{}": "decoder.time_conv.{}",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.middle_block.block_1": "decoder.mid.block_1",
    "decoder.middle_block.attn_norm": "decoder.mid.attn_1.norm",
    "decoder.middle_block.attn_1.q_proj": "decoder.mid.attn_1.q",
    "decoder.middle_block.attn_1.k_proj": "decoder.mid.attn_1.k",
    "decoder.middle_block.attn_1.v_proj": "decoder.mid.attn_1.v",
    "decoder.middle_block.attn_1.out_proj": "decoder.mid.attn_1.proj_out",
    "decoder.middle_block.block_2": "decoder.mid.block_2",
    "decoder.up_block.up.{}.block.{}": "decoder.up.{}.block.{}",
    "decoder.up_block.up.{}.attn_norms.{}": "decoder.up.{}.attn.{}.norm",
    "decoder.up_block.up.{}.attn.{}.q_proj": "decoder.up.{}.attn.{}.q",
    "decoder.up_block.up.{}.attn.{}.k_proj": "decoder.up.{}.attn.{}.k",
    "decoder.up_block.up.{}.attn.{}.v_proj": "decoder.up.{}.attn.{}.v",
    "decoder.up_block.up.{}.attn.{}.out_proj": "decoder.up.{}.attn.{}.proj_out",
    "decoder.up_block.up.{}.upsample": "decoder.up.{}.upsample",
    "decoder.norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quantize.embedding": "quantize.embedding",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def rename(key: str, name_map: dict[str, str], source: str = "checkpoint") -> str:
    """Map one checkpoint key through a `{}`-template name map (see the module docstring)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # longest module path first
        template = ".".join("{}" if p.isdigit() else p for p in parts[:n])
        if template in name_map:
            indices = [p for p in parts[:n] if p.isdigit()]
            return ".".join([name_map[template].format(*indices)] + parts[n:])
    raise ValueError(f"{source}: no entry in the name map for key {key!r}")


def vq_from_hf(state_dict: dict[str, Tensor], prefix: str = "vqmodel.",
               source: str = "checkpoint") -> dict[str, Tensor]:
    """transformers/-hf VQ weights -> original Emu3-VisionTokenizer names (and nano_emu.vq's). Keys outside
    `prefix` (the language model in a full -hf checkpoint) are skipped; every key inside it must map."""
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        hf_key = key[len(prefix):]
        if re.search(r"\.(q|k|v|out)_proj\.weight$", hf_key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> the released 1x1 Conv2d [C, C, 1, 1]
        out[rename(hf_key, VQ_HF_TO_ORIGINAL, source)] = tensor
    return out


def check_state_dict(module: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and shape mismatches between `shapes` (checkpoint
    key -> shape, e.g. read from safetensors headers before any tensor is) and the module's state dict."""
    expected = module.state_dict()
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


def read_safetensors(path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """Tensors whose names start with `prefix` from a .safetensors file, or from every shard in a directory
    (so the VQ can be read out of a sharded -hf checkpoint without loading the language model)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no .safetensors file at {path}")
    tensors = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys() if k.startswith(prefix)})
    return tensors


def load_vq(path: str | Path, cfg: VQConfig | None = None, device: str | torch.device = "cpu") -> VQModel:
    """Build a VQModel (default VQConfig.emu3()) on the meta device and load released weights into it, in eval mode:
    an -hf checkpoint file/directory (keys under `vqmodel.`) or the original Emu3-VisionTokenizer model.safetensors."""
    cfg = cfg or VQConfig.emu3()
    state_dict = read_safetensors(path, prefix="vqmodel.")  # only the VQ out of a full -hf checkpoint
    if state_dict:
        state_dict = vq_from_hf(state_dict, source=str(path))
    else:
        state_dict = read_safetensors(path)  # the original tokenizer checkpoint holds nothing else
    with torch.device("meta"):
        model = VQModel(cfg)
    load_state_dict_strict(model, state_dict, source=str(path), assign=True)
    return model.to(device).eval()
