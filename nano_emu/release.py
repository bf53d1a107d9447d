"""A fine-tune's base model: which release and key layout it came from, and the way back into that layout.

    base = load_base("emu3", "BAAI/Emu3-Gen-hf")                  # or "tiny", "llamagen" (+ vq), "chameleon"
    ... train base.pipe.gpt ...
    save_release(base, merged_state(base.pipe.gpt), "out/model", settings)   # loads where the release loads
    save_adapter(adapter_of(base, base.pipe.gpt, lora_config), "out/adapter")  # peft.PeftModel loads it

The loaders (emu3.py, llamagen.py, chameleon.py, tiny.py) map each released layout's names onto gpt.py's; this
file holds the inverse of those literal name maps, so that a fine-tuned GPT goes back where it came from:
- Emu3, original layout (BAAI/Emu3-Gen, -Chat): `model.*` + `lm_head.weight`, the config, tokenizer and remote code
  copied beside them; the VQ stays the separate Emu3-VisionTokenizer folder, untouched.
- Emu3, -hf (and transformers' in-memory names): `text_model.model.*`, `text_model.lm_head.weight`, and the
  release's own `vqmodel.*` tensors copied unchanged, as transformers' save_pretrained writes them.
- LlamaGen: the authors' GPT names (`tok_embeddings`, fused `attention.wqkv` with the RoPE rows back in Meta's
  interleaved order, `feed_forward.w1/w2/w3`, `output`) in {"model": state_dict}, saved by torch.save with tensors
  only (torch.load(weights_only=True) reads it, as their sample scripts and nano_emu do); the VQ file is untouched.
- Chameleon / Anole (transformers layout): `model.*`, `lm_head.weight` and the release's `model.vqmodel.*`.
- tiny (a train_tiny.py run as the "release"): vq.safetensors copied, gpt.safetensors with the run's metadata.
Big state dicts are sharded as transformers shards them (model-0000i-of-0000n.safetensors + an index). The folder
is written beside its destination and renamed into place, so a crash never leaves a half-written model there.

peft adapters name modules as the model peft wraps names them: transformers' in-memory names for Emu3 (-hf:
`model.text_model.layers.*`; original: `model.layers.*`, as transformers' Emu3ForCausalLM) and Chameleon
(`model.layers.*`), the authors' names for LlamaGen, whose fused wqkv carries q, k and v's updates side by side
(rank 3r, lora_alpha 3 alpha through peft's rank_pattern / alpha_pattern, so alpha / r is unchanged).
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import chameleon, emu3, llamagen
from .checkpoint import read_meta, save_checkpoint
from .hub import resolve
from .lora import (Adapter, AdapterMismatch, LoRAConfig, LoRALinear, attach, deltas, module_scaling, read_adapter,
                   unload)
from .pipeline import Pipeline
from .tiny import load_tiny
from .weights import open_checkpoint, rename

FAMILIES = ("tiny", "emu3", "llamagen", "chameleon")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
INDEXES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
SHARD_BYTES = 5 * 2**30    # transformers' default max_shard_size
SETTINGS_FILE = "finetune.json"


@dataclass
class Base:
    family: str            # one of FAMILIES
    layout: str            # emu3: "original", "-hf" or "transformers"; otherwise the family's one layout
    pipe: Pipeline
    name: str              # as given (a folder or a Hub id): peft's base_model_name_or_path
    path: Path             # the resolved folder (LlamaGen: the GPT file)
    vq_path: Path | None   # Emu3's original layout: the VisionTokenizer folder; LlamaGen: the VQ file
    fingerprint: str


def fingerprint(gpt) -> str:
    """What tells one base model from another of the same shapes (Emu3-Gen from Emu3-Chat): the config, the final
    norm and the first embedding rows, which LoRA never trains, read at bf16 precision so that the same weights
    loaded in float32 or bfloat16 agree."""
    digest = hashlib.sha256(json.dumps(asdict(gpt.config), sort_keys=True).encode())
    for tensor in (gpt.norm.weight, gpt.embed_tokens.weight[:8]):
        digest.update(tensor.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


def emu3_layout(folder: Path) -> str:
    """An Emu3 folder's key layout (emu3.key_layout), from its config.json and shard headers."""
    return emu3.key_layout(emu3.read_config(folder, "Emu3"), open_checkpoint(folder).shapes)


def load_base(family: str, path, vq=None, device="cpu", dtype=torch.float32, image_size: int | None = None,
              gpt_model: str | None = None, n_head: int | None = None) -> Base:
    """The family's loader, plus where the weights came from (for the writers) and the base's fingerprint.
    image_size: LlamaGen's and Chameleon's pixels per side (LlamaGen: default from the file name; Chameleon: 512);
    n_head: a LlamaGen GPT of a size LlamaGen never released (load_llamagen's)."""
    vq_path = None
    if family == "tiny":
        folder, layout = Path(path), "tiny"
        pipe = load_tiny(folder, device=device, dtype=dtype)
    elif family == "emu3":
        folder = resolve(path, emu3.EMU3_FILES)
        pipe = emu3.load_emu3(folder, vq_path=vq, device=device, dtype=dtype)
        layout = emu3_layout(folder)
        vq_path = resolve(vq, emu3.EMU3_VQ_FILES) if vq is not None else None
    elif family == "llamagen":
        folder, vq_path, layout = resolve(path, None), resolve(vq, None), "pt"
        pipe = llamagen.load_llamagen(folder, vq_path, gpt_model=gpt_model, image_size=image_size, device=device,
                                      dtype=dtype, n_head=n_head)
    elif family == "chameleon":
        folder, layout = resolve(path, chameleon.CHAMELEON_FILES), "transformers"
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"{folder} is Chameleon's original layout; fine-tuning writes the transformers layout "
                             f"back, so convert it first with transformers' convert_chameleon_weights_to_hf.py")
        pipe = chameleon.load_chameleon(folder, device=device, dtype=dtype, image_size=image_size or 512)
    else:
        raise ValueError(f"unknown family {family!r}; the families are {', '.join(FAMILIES)}")
    return Base(family, layout, pipe, str(path), Path(folder), vq_path, fingerprint(pipe.gpt))


# ---------------------------------------------------------------------------------------------------------------
# names: nano_emu's -> the release's


# gpt.py's names -> LlamaGen's (q, k and v are fused into wqkv apart from this map: llamagen_state, fuse_qkv)
LLAMAGEN_NAMES = {ours: theirs for theirs, ours in llamagen.GPT_NAMES.items()}


def name_map(base: Base, in_memory: bool = False) -> dict[str, str]:
    """gpt.py module path (template) -> the release's. in_memory: the names of the model peft wraps (transformers'
    in-memory names), not of the files on disk; they differ for Emu3's -hf layout only."""
    if base.family == "tiny":
        return {}
    if base.family == "emu3":
        layout = base.layout if base.layout == "original" else ("transformers" if in_memory else "-hf")
        prefixes = emu3.KEY_LAYOUTS[layout]
        return {ours: prefixes["decoder"] + theirs for theirs, ours in emu3.DECODER_NAMES.items()} | {
            "lm_head": prefixes["head"].removesuffix(".weight")}
    if base.family == "chameleon":
        return {ours: theirs for theirs, ours in chameleon.HF_NAMES.items()}
    return LLAMAGEN_NAMES



def released_name(key: str, names: dict[str, str]) -> str:
    return rename(key, names, "nano_emu's GPT") if names else key


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """gpt.interleaved_to_halves undone: each head's rows [first half, second half] back to Meta's (even, odd)."""
    head_dim = weight.shape[0] // n_heads
    order = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)], 1).flatten()
    return weight.view(n_heads, head_dim, -1)[:, order.to(weight.device)].reshape(weight.shape)


def llamagen_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """gpt.py's state dict -> LlamaGen's (llamagen.gpt_from_llamagen inverted)."""
    out = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight", key)
        if match is None:
            out[rename(key, LLAMAGEN_NAMES)] = tensor
        elif match[2] == "q":
            attn = f"layers.{match[1]}.self_attn"
            out[f"layers.{match[1]}.attention.wqkv.weight"] = torch.cat([
                halves_to_interleaved(tensor, config.n_head),
                halves_to_interleaved(state[f"{attn}.k_proj.weight"], config.n_kv_head),
                state[f"{attn}.v_proj.weight"]])
    return out


# ---------------------------------------------------------------------------------------------------------------
# peft adapters


def adapter_of(base: Base, gpt, config: LoRAConfig, state: dict | None = None) -> Adapter:
    """The LoRA modules of `gpt` as a peft adapter for the base's released model. state: the GPT's state dict as
    whole tensors (under FSDP, the gathered one); default the modules' own."""
    state = gpt.state_dict() if state is None else state
    weights = {path: (state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"])
               for path, m in deltas(gpt).items() if isinstance(m, LoRALinear)}
    rank_pattern, alpha_pattern = {}, {}
    if base.family == "llamagen":   # fuse_qkv names the wqkv modules as LlamaGen does already
        weights = {m if m.endswith(".wqkv") else released_name(m, LLAMAGEN_NAMES): ab
                   for m, ab in fuse_qkv(weights, gpt.config).items()}
        if any(m.endswith(".wqkv") for m in weights):
            rank_pattern, alpha_pattern = {"wqkv": 3 * config.rank}, {"wqkv": 3 * config.alpha}
    else:
        names = name_map(base, in_memory=True)
        weights = {released_name(path, names): ab for path, ab in weights.items()}
    return Adapter(config, weights, module_pattern(weights), base.name, base.fingerprint, rank_pattern,
                   alpha_pattern)


def module_pattern(modules) -> str:
    """peft's target_modules as a regex it full-matches: these module names, layer indices generalised, so that
    nothing else (Emu3's VQ has q_proj modules too) is targeted when peft wraps the model."""
    escaped = {re.sub(r"(?<=\\\.)\d+(?=\\\.)", lambda m: r"\d+", re.escape(m)) for m in modules}
    return "^(?:" + "|".join(sorted(escaped)) + ")$"


def fuse_qkv(weights: dict, config) -> dict:
    """LlamaGen: each layer's q, k and v LoRA (rank r each) -> one on wqkv of rank 3r: A stacked, B block-diagonal,
    q's and k's rows back in the interleaved RoPE order. Exact: wqkv's update is q's, k's and v's stacked."""
    out = {k: v for k, v in weights.items() if not re.search(r"\.self_attn\.[qkv]_proj$", k)}
    layers = sorted({int(m[1]) for k in weights if (m := re.fullmatch(r"layers\.(\d+)\.self_attn\.[qkv]_proj", k))})
    for i in layers:
        parts = [weights.get(f"layers.{i}.self_attn.{p}_proj") for p in "qkv"]
        if any(part is None for part in parts):
            raise ValueError("LlamaGen fuses q, k and v into one wqkv: LoRA must target all three or none")
        (aq, bq), (ak, bk), (av, bv) = parts
        a = torch.cat([aq, ak, av])                                                  # (3r, dim)
        r, rows = aq.shape[0], [bq.shape[0], bk.shape[0], bv.shape[0]]
        b = torch.zeros(sum(rows), 3 * r, dtype=bq.dtype, device=bq.device)         # (q + k + v rows, 3r)
        b[:rows[0], :r] = halves_to_interleaved(bq, config.n_head)
        b[rows[0]:rows[0] + rows[1], r:2 * r] = halves_to_interleaved(bk, config.n_kv_head)
        b[rows[0] + rows[1]:, 2 * r:] = bv
        out[f"layers.{i}.attention.wqkv"] = (a, b)
    return out


def adapter_weights(base: Base, adapter: Adapter, source: str) -> dict[str, tuple]:
    """A peft adapter for the base's released model -> nano_emu paths -> (A, B, scaling), for lora.attach."""
    from .gpt import interleaved_to_halves
    names = name_map(base, in_memory=True)
    ours_by_theirs = {theirs: ours for ours, theirs in names.items()}
    out, cfg = {}, base.pipe.gpt.config
    for module, (a, b) in adapter.weights.items():
        scaling = module_scaling(adapter, module)
        fused = re.fullmatch(r"layers\.(\d+)\.attention\.wqkv", module) if base.family == "llamagen" else None
        if fused:   # one update of the stacked rows: each projection takes its rows of B, at wqkv's rank
            q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
            bq, bk, bv = b.split([q, kv, kv])
            attn = f"layers.{fused[1]}.self_attn"
            out[f"{attn}.q_proj"] = (a, interleaved_to_halves(bq, cfg.n_head), scaling)
            out[f"{attn}.k_proj"] = (a, interleaved_to_halves(bk, cfg.n_kv_head), scaling)
            out[f"{attn}.v_proj"] = (a, bv, scaling)
            continue
        try:
            ours = rename(module, ours_by_theirs, source) if names else module
        except ValueError:
            ours = f"(no nano_emu module for {module})"
        out[ours] = (a, b, scaling)
    return out


# ---------------------------------------------------------------------------------------------------------------
# writing the released layout


def save_release(base: Base, state: dict[str, torch.Tensor], out, settings: dict,
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the plain GPT state dict `state` (whole tensors, gpt.py's names; lora.merged_state) into `out` in the
    base's released layout, with `settings` as finetune.json beside it. Returns `out`."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if base.family == "tiny":
        meta = read_meta(base.path / "gpt.safetensors")   # config, layout, tokenizer, sampling, the VQ's hash
        shutil.copy2(base.path / "vq.safetensors", partial / "vq.safetensors")
        save_checkpoint(partial / "gpt.safetensors", state, {**meta, "step": meta.get("steps"), "history": [],
                                                             "finetune": settings})
    elif base.family == "llamagen":
        torch.save({"model": {k: v.contiguous() for k, v in llamagen_state(state, base.pipe.gpt.config).items()}},
                   partial / base.path.name)
    else:
        names = name_map(base)
        tensors = {released_name(k, names): v for k, v in state.items()}
        # the VQ's tensors as released, untouched: Emu3 -hf keeps them under vqmodel. (also for a source saved with
        # transformers' in-memory names: -hf is what save_pretrained writes), Chameleon under model.vqmodel.;
        # Emu3's original layout has none (its VQ is the separate VisionTokenizer folder)
        if base.family == "emu3":
            prefix, written = emu3.KEY_LAYOUTS[base.layout]["vq"], emu3.KEY_LAYOUTS["-hf"]["vq"]
        else:   # Chameleon: always the transformers layout (load_base refuses the original)
            prefix = written = chameleon.HF_VQ_PREFIX
        if prefix is not None:
            checkpoint = open_checkpoint(base.path)
            vq = checkpoint.read([k for k in checkpoint.shapes if k.startswith(prefix)])
            tensors |= {written + k[len(prefix):]: v for k, v in vq.items()}
        write_shards(tensors, partial, shard_bytes)
        for file in base.path.iterdir():   # config, tokenizer, generation config, remote code: as released
            if file.is_file() and file.suffix not in WEIGHT_SUFFIXES and file.name not in INDEXES | {SETTINGS_FILE}:
                shutil.copy2(file, partial / file.name)
    (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> None:
    """model.safetensors, or shards of at most shard_bytes (a tensor never split) + model.safetensors.index.json."""
    shards, size = [{}], 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key].detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def apply_adapter(pipe: Pipeline, family: str, path, folder) -> None:
    """sample.py --adapter: a base loaded as the release loads it (family, the path or Hub id it came from) plus a
    peft adapter folder -> the adapter merged into the Pipeline's GPT (then a plain GPT again). An adapter trained
    on another base is refused: other modules or shapes, or (an adapter nano_emu wrote) another base's
    fingerprint, e.g. an Emu3-Chat adapter on Emu3-Gen, whose shapes are the same."""
    layout = {"tiny": "tiny", "llamagen": "pt", "chameleon": "transformers"}.get(family)
    if family == "emu3":
        layout = emu3_layout(resolve(path, emu3.EMU3_FILES))
    base = Base(family, layout, pipe, str(path), Path(str(path)), None, fingerprint(pipe.gpt))
    adapter = read_adapter(folder)
    if adapter.base_fingerprint and adapter.base_fingerprint != base.fingerprint:
        raise AdapterMismatch(f"{folder} was trained on another base model ({adapter.base_name or 'unnamed'}, "
                              f"fingerprint {adapter.base_fingerprint}) than {path} (fingerprint "
                              f"{base.fingerprint}): load it on the base it was trained on")
    attach(pipe.gpt, adapter_weights(base, adapter, str(folder)), str(folder))
    unload(pipe.gpt)
