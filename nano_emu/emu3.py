"""Load the released Emu3 weights (downloaded Hub folders) into a Pipeline.

    pipe = load_emu3("Emu3-Gen", vq_path="Emu3-VisionTokenizer", device="cuda")   # original layout: two folders
    pipe = load_emu3("Emu3-Gen-hf", device="cuda")                                # -hf layout: one folder
    image = pipe.draw(["a cat on a mat"], seed=0)[0]        # 720x720, CFG 3 against the demo's negative prompt

The same weights come in three key layouts:
- original (baaivision/Emu3 remote code: BAAI/Emu3-Gen, -Chat, -Stage1): config.json with the Llama fields at top
  level (model_type "Emu3"), `model.*` + `lm_head.weight`, tokenizer emu3.tiktoken + emu3_vision_tokens.txt; the VQ
  is its own folder, BAAI/Emu3-VisionTokenizer (model_type "Emu3VisionVQ"), in the names nano_emu.vq uses.
- -hf (transformers' convert_emu3_weights_to_hf.py; transformers 5's save_pretrained writes the same names): one
  folder, config.json with text_config + vq_config (model_type "emu3"), `text_model.model.*`,
  `text_model.lm_head.weight` and `vqmodel.*` (renamed VQ, mapped back by vq_from_hf), tokenizer.json.
- transformers >= 4.52's in-memory names (a state dict saved as is): `model.text_model.*`, `lm_head.weight`,
  `model.vqmodel.*`, with the -hf config.

Memory: the GPT is built on the meta device; each tensor is read from its memory-mapped shard, cast and moved to
the device on its own, then assigned, so the fp32 checkpoint (34 GB) is never held next to the bf16 model (17 GB).
Every shard header is opened and every name and shape checked before the first tensor is read: a wrong or
incomplete download fails in seconds with one message, never with a half-loaded model.
"""

import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from .gpt import GPT, GPTConfig
from .hub import resolve
from .layout import EMU3_CHAT_TEMPLATE, Layout
from .pipeline import Pipeline
from .sampler import Guidance, Sampling
from .tokenizer import ROLE_TOKENS, Emu3Tokenizer
from .vq import VQConfig, VQModel
from .weights import (check_strict, llama_config_fields, load_strict, open_checkpoint, read_json, rename,
                      rename_or_keep)

# Emu3-Gen's demo conventions (image_generation.py in baaivision/Emu3; transformers' docs use the same negative)
EMU3_PROMPT_SUFFIX = " masterpiece, film grained, best quality."
EMU3_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                        "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                        "username, blurry.")
EMU3_SAMPLING = Sampling(top_k=2048)   # the demo samples with top_k 2048 at temperature 1
EMU3_GUIDANCE = Guidance(cfg_scale=3.0)   # on log-probs, against the negative prompt
DEFAULT_IMAGE_AREA = 720 * 720    # -hf configs carry no image_area; transformers' Emu3Processor defaults to this

# what the loaders read of a Hub repo (hub.resolve): config, weights and either layout's tokenizer files
EMU3_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "emu3.tiktoken",
              "emu3_vision_tokens.txt", "tokenizer.json"]
EMU3_VQ_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]

# Where each key layout keeps the decoder, its output head and the VQ (None: the separate VisionTokenizer folder)
KEY_LAYOUTS = {
    "original": {"decoder": "model.", "head": "lm_head.weight", "vq": None},
    "-hf": {"decoder": "text_model.model.", "head": "text_model.lm_head.weight", "vq": "vqmodel."},
    "transformers": {"decoder": "model.text_model.", "head": "lm_head.weight", "vq": "model.vqmodel."},
}

# Emu3's (Llama's) decoder modules, below the layout's decoder prefix -> nano_emu.gpt's. gpt.py kept the released
# names, so this reads as an identity; it is still the whole list, so anything else in a checkpoint is reported.
DECODER_NAMES = {
    "embed_tokens": "embed_tokens",
    "layers.{}.input_layernorm": "layers.{}.input_layernorm",
    "layers.{}.self_attn.q_proj": "layers.{}.self_attn.q_proj",
    "layers.{}.self_attn.k_proj": "layers.{}.self_attn.k_proj",
    "layers.{}.self_attn.v_proj": "layers.{}.self_attn.v_proj",
    "layers.{}.self_attn.o_proj": "layers.{}.self_attn.o_proj",
    "layers.{}.post_attention_layernorm": "layers.{}.post_attention_layernorm",
    "layers.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "layers.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "norm": "norm",
}

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


# Emu3-VisionTokenizer config.json fields and their -hf vq_config names -> VQConfig fields
VQ_CONFIG_NAMES = {
    "ch": "ch", "base_channels": "ch", "ch_mult": "ch_mult", "channel_multiplier": "ch_mult",
    "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_levels", "embed_dim": "embed_dim",
    "codebook_size": "codebook_size", "temporal_downsample_factor": "temporal_factor", "in_channels": "in_channels",
}
# token roles -> the config.json field that states the id (the original config has all; -hf the first three)
ROLE_CONFIG_NAMES = {"pad": "pad_token_id", "bos": "bos_token_id", "eos": "eos_token_id", "img": "img_token_id",
                     "boi": "boi_token_id", "eoi": "eoi_token_id", "eol": "eol_token_id", "eof": "eof_token_id"}


def read_config(folder: Path, what: str) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (or is not a folder)")
    return read_json(folder / "config.json", f"downloaded {what} folder")


def gpt_config(text: dict, source: str) -> GPTConfig:
    """The language model's config.json fields -> GPTConfig. A missing field takes the released value, as in
    transformers' Emu3 config classes, whose defaults are the released numbers."""
    fields = llama_config_fields(text, source, "Emu3")   # the same names in the original config and -hf text_config
    if text.get("hidden_act", "silu") != "silu":   # (a tied head or another head_dim fails the shape check)
        raise ValueError(f"{source}: hidden_act {text['hidden_act']!r} is not supported (Emu3's MLP is SwiGLU)")
    return GPTConfig.emu3_8b(**fields)


def vq_config(fields: dict, source: str) -> VQConfig:
    """Emu3-VisionTokenizer's config.json or the -hf vq_config -> VQConfig (released values where a field is
    missing; 32 GroupNorm groups and no L2 normalisation are fixed in both released implementations)."""
    given = {ours: fields[theirs] for theirs, ours in VQ_CONFIG_NAMES.items() if fields.get(theirs) is not None}
    config = VQConfig(**{**asdict(VQConfig.emu3()), **given})
    latent = fields.get("z_channels", fields.get("latent_channels", config.embed_dim))
    double = fields.get("double_z", fields.get("double_latent", False))
    out_channels, heads = fields.get("out_channels", config.in_channels), fields.get("num_attention_heads", 1)
    if latent != config.embed_dim or double or out_channels != config.in_channels or heads != 1:
        raise ValueError(f"{source}: nano_emu.vq needs the released VQ structure (z_channels == embed_dim, double_z "
                         f"false, out_channels == in_channels, single-head attention); got z_channels {latent}, "
                         f"embed_dim {config.embed_dim}, double_z {double}, out_channels {out_channels}, heads {heads}")
    return config


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


def load_emu3_vq(path: str | Path, cfg: VQConfig | None = None, device: str | torch.device = "cpu") -> VQModel:
    """The VQ alone, in eval mode (default VQConfig.emu3()): the original Emu3-VisionTokenizer model.safetensors (the
    names nano_emu.vq uses) or an -hf checkpoint file/folder (keys under `vqmodel.`; the language model is skipped)."""
    path = resolve(path, EMU3_VQ_FILES)
    checkpoint = open_checkpoint(path)
    vq_keys = [k for k in checkpoint.shapes if k.startswith("vqmodel.")]
    with torch.device("meta"):
        model = VQModel(cfg or VQConfig.emu3())
    if vq_keys:
        load_strict(model, checkpoint, lambda t: vq_from_hf(t, source=str(path)), str(path), keys=vq_keys,
                    device=device)
    else:
        load_strict(model, checkpoint, dict, str(path), device=device)
    return model.eval()


def key_layout(config: dict, keys) -> str:
    """Which of KEY_LAYOUTS a checkpoint uses, from its config.json and its tensor names: an -hf config has
    text_config; transformers' in-memory names put the decoder under model.text_model."""
    if "text_config" not in config:
        return "original"
    return "transformers" if any(k.startswith(KEY_LAYOUTS["transformers"]["decoder"]) for k in keys) else "-hf"


def gpt_names(keys, layout: dict) -> dict[str, str]:
    """checkpoint key -> GPT key for every key outside the VQ. Unknown keys keep their name, so the strict check
    lists them as unexpected (all at once, not just the first)."""
    decoder = {layout["decoder"] + theirs: ours for theirs, ours in DECODER_NAMES.items()}
    names = {}
    for key in keys:
        if layout["vq"] and key.startswith(layout["vq"]):
            continue
        names[key] = "lm_head.weight" if key == layout["head"] else rename_or_keep(key, decoder)
    return names


def check_tokenizer(tokenizer: Emu3Tokenizer, text: dict, gpt: GPTConfig, vq: VQConfig, folder: Path) -> None:
    problems = []
    if tokenizer.n_vocab != gpt.vocab_size:
        problems.append(f"it has {tokenizer.n_vocab} ids, config.json says vocab_size {gpt.vocab_size}")
    if tokenizer.n_visual != vq.codebook_size:
        problems.append(f"it has {tokenizer.n_visual} visual tokens, the VQ has {vq.codebook_size} codes")
    for role, field in ROLE_CONFIG_NAMES.items():
        stated = text.get(field)
        if stated is not None and tokenizer.role_ids[role] not in (stated if isinstance(stated, list) else [stated]):
            problems.append(f"config.json {field} is {stated}, the tokenizer's {ROLE_TOKENS[role]} is "
                            f"{tokenizer.role_ids[role]}")
    if problems:
        raise ValueError(f"the tokenizer in {folder} does not fit the model: " + "; ".join(problems))


def load_emu3(path: str | Path, vq_path: str | Path | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16) -> Pipeline:
    """An Emu3-Gen / Emu3-Chat folder (original layout + vq_path = the Emu3-VisionTokenizer folder, or -hf alone)
    -> a Pipeline in eval mode: the GPT in `dtype` (the checkpoints are fp32; the demos run bf16), the VQ in fp32
    as in the demos, and the checkpoint's prompt conventions (image area, Gen's suffix and negative prompt, Chat's
    template, top-k 2048). Emu3-Stage1 loads too, but its understanding template is plain "{image}{question}".
    path and vq_path may be Hugging Face Hub ids ("BAAI/Emu3-Gen", "BAAI/Emu3-VisionTokenizer@<commit>"; hub.py)."""
    folder = resolve(path, EMU3_FILES)
    config = read_config(folder, "Emu3")
    model_type = config.get("model_type")
    if model_type == "Emu3VisionVQ":
        raise ValueError(f"{folder} is the vision tokenizer (Emu3-VisionTokenizer): pass it as vq_path (--vq), and "
                         f"the Emu3-Gen / Emu3-Chat folder as path (--weights)")
    if str(model_type).lower() != "emu3":
        raise ValueError(f"{folder / 'config.json'} describes a model of model_type {model_type!r}, not Emu3 "
                         f"('Emu3' in BAAI/Emu3-Gen and -Chat, 'emu3' in the -hf conversions)")
    is_hf = "text_config" in config
    text = config["text_config"] if is_hf else config
    gpt_cfg = gpt_config(text, str(folder / "config.json"))
    if is_hf:
        if vq_path is not None:
            raise ValueError(f"{folder} is an -hf checkpoint, which holds the VQ itself: leave vq_path (--vq) out")
        vq_folder, vq_cfg = folder, vq_config(config.get("vq_config") or {}, str(folder / "config.json"))
    else:
        if vq_path is None:
            raise ValueError(f"{folder} is an original-layout Emu3 checkpoint, whose VQ is a separate download: pass "
                             f"vq_path=<the BAAI/Emu3-VisionTokenizer folder> (sample.py: --vq)")
        vq_folder = resolve(vq_path, EMU3_VQ_FILES)
        vq_json = read_config(vq_folder, "Emu3-VisionTokenizer")
        if vq_json.get("model_type") != "Emu3VisionVQ":
            raise ValueError(f"{vq_folder / 'config.json'} describes a model of model_type "
                             f"{vq_json.get('model_type')!r}, not the vision tokenizer ('Emu3VisionVQ')")
        vq_cfg = vq_config(vq_json, str(vq_folder / "config.json"))
    tokenizer = Emu3Tokenizer.from_dir(folder, check_release_ids=False)   # checked against config.json instead
    check_tokenizer(tokenizer, text, gpt_cfg, vq_cfg, folder)

    # names and shapes of everything, from the headers, before any tensor is read
    checkpoint = open_checkpoint(folder)
    layout_name = key_layout(config, checkpoint.shapes)
    layout = KEY_LAYOUTS[layout_name]
    source = f"{folder} ({layout_name} layout)"
    names = gpt_names(checkpoint.shapes, layout)
    to_gpt = lambda tensors: {names[k]: t for k, t in tensors.items()}  # noqa: E731
    with torch.device("meta"):
        gpt, vq = GPT(gpt_cfg), VQModel(vq_cfg)
    check_strict(gpt, checkpoint, names, to_gpt, source)

    # the VQ first (1 GB, fp32): its problems show before the 34 GB of the language model are read
    if is_hf:
        vq_keys = [k for k in checkpoint.shapes if k.startswith(layout["vq"])]
        load_strict(vq, checkpoint, lambda t: vq_from_hf(t, prefix=layout["vq"], source=source),
                    f"{vq_folder} (VQ)", keys=vq_keys, device=device)
    else:
        load_strict(vq, open_checkpoint(vq_folder), dict, f"{vq_folder} (VQ)", device=device)
    load_strict(gpt, checkpoint, to_gpt, source, keys=names, device=device, dtype=dtype)
    return Pipeline(gpt.eval(), vq.eval(), tokenizer, Layout(**tokenizer.role_ids, codebook_size=tokenizer.n_visual),
                    image_area=int(config.get("image_area") or DEFAULT_IMAGE_AREA),
                    prompt_suffix=EMU3_PROMPT_SUFFIX, negative_prompt=EMU3_NEGATIVE_PROMPT,
                    chat_template=EMU3_CHAT_TEMPLATE, resize=None, sampling=EMU3_SAMPLING, guidance=EMU3_GUIDANCE)
