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
  `text_model.lm_head.weight` and `vqmodel.*` (renamed VQ, mapped back by weights.vq_from_hf), tokenizer.json.
- transformers >= 4.52's in-memory names (a state dict saved as is): `model.text_model.*`, `lm_head.weight`,
  `model.vqmodel.*`, with the -hf config.

Memory: the GPT is built on the meta device; each tensor is read from its memory-mapped shard, cast and moved to
the device on its own, then assigned, so the fp32 checkpoint (34 GB) is never held next to the bf16 model (17 GB).
Every shard header is opened and every name and shape checked before the first tensor is read: a wrong or
incomplete download fails in seconds with one message, never with a half-loaded model.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .gpt import GPT, GPTConfig
from .layout import EMU3_CHAT_TEMPLATE, Layout
from .pipeline import Pipeline
from .tokenizer import ROLE_TOKENS, Emu3Tokenizer
from .vq import VQConfig, VQModel
from .weights import check_state_dict, load_state_dict_strict, rename, vq_from_hf

# Emu3-Gen's demo conventions (image_generation.py in baaivision/Emu3; transformers' docs use the same negative)
EMU3_PROMPT_SUFFIX = " masterpiece, film grained, best quality."
EMU3_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                        "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                        "username, blurry.")
EMU3_SAMPLING = {"top_k": 2048}   # the demo samples with top_k 2048 at temperature 1
DEFAULT_IMAGE_AREA = 720 * 720    # -hf configs carry no image_area; transformers' Emu3Processor defaults to this

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

# config.json fields -> GPTConfig fields (the same names in the original config and in the -hf text_config)
GPT_CONFIG_NAMES = {
    "vocab_size": "vocab_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head", "hidden_size": "dim", "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len",
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
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a downloaded {what} folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def gpt_config(text: dict, source: str) -> GPTConfig:
    """The language model's config.json fields -> GPTConfig. A missing field takes the released value, as in
    transformers' Emu3 config classes, whose defaults are the released numbers."""
    fields = {ours: text[theirs] for theirs, ours in GPT_CONFIG_NAMES.items() if text.get(theirs) is not None}
    # RoPE: rope_theta + rope_scaling null (original), + rope_scaling {"rope_type": "default"} (-hf),
    # or rope_parameters {"rope_theta", "rope_type"} (transformers 5)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: RoPE scaling {rope} is not supported (Emu3 uses plain RoPE)")
    theta = text.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = float(theta)
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


def open_shard(file: Path):
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"cannot read {file}: {e}; the file is truncated or corrupt, download it again") from None


def read_headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (shard file, shape) for the checkpoint in `folder`, through model.safetensors.index.json when it is
    sharded, else the single model.safetensors. Opens every shard (a truncated one fails here, by name) but reads
    no tensor data."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index with a 'weight_map': {e!r}") from None
        files = {}
        for key, name in weight_map.items():
            files.setdefault(folder / name, []).append(key)
    elif (folder / "model.safetensors").is_file():
        files = {folder / "model.safetensors": None}   # None: every key in the file
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors.index.json with its shards, "
                                f"or model.safetensors")
    headers = {}
    for file, keys in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"{index} names the shard {file.name}, which is missing from {folder} "
                                    f"(an incomplete download?)")
        with open_shard(file) as shard:
            absent = sorted(set(keys or ()) - set(shard.keys()))
            if absent:
                raise ValueError(f"{index} places {absent[:5]} in {file.name}, which does not hold them")
            headers |= {key: (file, tuple(shard.get_slice(key).get_shape())) for key in keys or shard.keys()}
    return headers


def read_tensors(keys: dict[str, Path], device, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read `keys` (key -> shard) shard by shard; each floating tensor is cast to `dtype` and moved to `device`
    as soon as it is read, so at most one tensor in the checkpoint's dtype is alive beside the result."""
    by_file = {}
    for key, file in keys.items():
        by_file.setdefault(file, []).append(key)
    tensors = {}
    for file, names in by_file.items():
        with open_shard(file) as shard:
            for key in names:
                tensor = shard.get_tensor(key)
                tensors[key] = tensor.to(device, dtype if dtype and tensor.is_floating_point() else tensor.dtype)
    return tensors


def gpt_names(keys, layout: dict) -> dict[str, str]:
    """checkpoint key -> GPT key for every key outside the VQ. Unknown keys keep their name, so the strict check
    lists them as unexpected (all at once, not just the first)."""
    names = {}
    for key in keys:
        if layout["vq"] and key.startswith(layout["vq"]):
            continue
        if key == layout["head"]:
            names[key] = "lm_head.weight"
        elif key.startswith(layout["decoder"]):
            try:
                names[key] = rename(key[len(layout["decoder"]):], DECODER_NAMES)
            except ValueError:
                names[key] = key
        else:
            names[key] = key
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
    template, top-k 2048). Emu3-Stage1 loads too, but its understanding template is plain "{image}{question}"."""
    folder = Path(path)
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
        vq_folder = Path(vq_path)
        vq_json = read_config(vq_folder, "Emu3-VisionTokenizer")
        if vq_json.get("model_type") != "Emu3VisionVQ":
            raise ValueError(f"{vq_folder / 'config.json'} describes a model of model_type "
                             f"{vq_json.get('model_type')!r}, not the vision tokenizer ('Emu3VisionVQ')")
        vq_cfg = vq_config(vq_json, str(vq_folder / "config.json"))
    tokenizer = Emu3Tokenizer.from_dir(folder, check_release_ids=False)   # checked against config.json instead
    check_tokenizer(tokenizer, text, gpt_cfg, vq_cfg, folder)

    # names and shapes of everything, from the headers, before any tensor is read
    headers = read_headers(folder)
    layout_name = "original"
    if is_hf:
        layout_name = "transformers" if any(k.startswith("model.text_model.") for k in headers) else "-hf"
    layout = KEY_LAYOUTS[layout_name]
    source = f"{folder} ({layout_name} layout)"
    names = gpt_names(headers, layout)
    with torch.device("meta"):
        gpt, vq = GPT(gpt_cfg), VQModel(vq_cfg)
    check_state_dict(gpt, {ours: headers[theirs][1] for theirs, ours in names.items()}, source)

    # the VQ first (1 GB, fp32): its problems show before the 34 GB of the language model are read
    if is_hf:
        vq_keys = {k: file for k, (file, _) in headers.items() if k.startswith(layout["vq"])}
        vq_state = vq_from_hf(read_tensors(vq_keys, device), prefix=layout["vq"], source=source)
    else:
        vq_state = read_tensors({k: file for k, (file, _) in read_headers(vq_folder).items()}, device)
    load_state_dict_strict(vq, vq_state, source=f"{vq_folder} (VQ)", assign=True)

    state = read_tensors({theirs: headers[theirs][0] for theirs in names}, device, dtype)
    load_state_dict_strict(gpt, {ours: state.pop(theirs) for theirs, ours in names.items()}, source, assign=True)
    return Pipeline(gpt.eval(), vq.eval(), tokenizer, Layout(**tokenizer.role_ids, codebook_size=tokenizer.n_visual),
                    image_area=int(config.get("image_area") or DEFAULT_IMAGE_AREA),
                    prompt_suffix=EMU3_PROMPT_SUFFIX, negative_prompt=EMU3_NEGATIVE_PROMPT,
                    chat_template=EMU3_CHAT_TEMPLATE, resize=None, sampling=dict(EMU3_SAMPLING))
