"""Load Meta's Chameleon (and GAIR's Anole, which can draw) into a Pipeline.

    pipe = load_chameleon("chameleon-7b")                  # transformers layout (facebook/chameleon-7b)
    pipe = load_chameleon("data/models/7b")                # original layout (+ data/tokenizer/)
    pipe.answer("cat.png", "What animal is this?")         # image + question -> text
    pipe = load_chameleon("Anole-7b-v0.1-hf")              # Anole: the same model, with image-token rows that draw
    image = pipe.draw(["a watercolor fox"], seed=0)[0]     # 512x512: 1024 codes then EOI, CFG 3, T 0.7, top-p 0.9

Chameleon (arXiv 2405.09818, github.com/facebookresearch/chameleon) is CM3Leon's open successor: a Llama-2 decoder
with per-head qk-LayerNorm (and swin-norm in the 30B) over one 65536-id vocabulary that holds the text BPE and the
8192 codes of a taming VQGAN (512 px -> 32x32). Both models are presets of nano_emu's own modules
(GPTConfig.chameleon, VQConfig.chameleon, Layout.chameleon; docs/families.md lists the switches); this file holds
only what is particular to the release: the name maps, the config translation, the ids read off the tokenizer and
the prompt and sampling conventions.

Meta's released weights understand images but were cut off from drawing them (the image-token rows of the output
head do not produce images; transformers masks them out). Anole fine-tuned exactly those rows, so drawing needs
Anole's weights; the code path is the same.

Two folder layouts, both checked name by name and shape by shape (weights.py) before any tensor is read:
- transformers (`facebook/chameleon-7b`, `leloy/Anole-7b-v0.1-hf`): config.json (text fields + vq_config),
  *.safetensors with `model.layers.*`, `lm_head.weight` and `model.vqmodel.*` (taming names, which are ours),
  tokenizer.json. The conversion drops the VQ decoder, so Chameleon's -hf VQ encodes only; Anole's keeps it.
- original (`data/models/7b/`): consolidated.pth + params.json (Meta names, RoPE in the interleaved layout, one
  qk-LayerNorm of head_dim shared by all heads), with `tokenizer/` (vqgan.ckpt, a Lightning checkpoint whose
  `loss.*` discriminator keys are skipped; vqgan.yaml; text_tokenizer.json) beside it or at ../../tokenizer.
  Everything is read with torch.load(weights_only=True), memory-mapped. The 30B's four tensor-parallel shards
  (consolidated.00-03.pth) are not merged here: convert them with transformers' script and load that folder.
"""

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .gpt import GPT, GPTConfig, interleaved_to_halves
from .hub import resolve
from .layout import Layout
from .pipeline import Pipeline
from .sampler import Guidance, Sampling
from .tokenizer import JSONTokenizer
from .vq import VQConfig, VQModel
from .weights import check_strict, llama_config_fields, load_strict, open_checkpoint, read_json, rename_or_keep

# Chameleon's reference ImageDecoder / Anole's demo: 3-way CFG (text 3.0, image 1.2) on logits, T 0.7, top-p 0.9.
# Pipeline.draw prompts hold text only, so the image-only branch IS the unconditional one [BOS, BOI] and the 3-way
# mix uncond + 1.2 (image - uncond) + 3.0 (full - image) is exactly 2-way CFG at 3.0; the image scale matters only
# for prompts with images (sampler.generate_image_stream(image_prompts=..., guidance=Guidance(3.0, image_scale=1.2))).
CHAMELEON_CFG_IMAGE_SCALE = 1.2
CHAMELEON_GUIDANCE = Guidance(cfg_scale=3.0, cfg_on="logits")
CHAMELEON_SAMPLING = Sampling(temperature=0.7, top_p=0.9)
# understanding: the question, the image block, then the separator transformers' processor appends in chat mode
CHAMELEON_CHAT_TEMPLATE = "{question}{image}<reserved08706>"
CHAMELEON_IMAGE_SIZE = 512

# the tokens layout.py needs, by name (ids in the release: 0, 1, 2, 8196, 8197)
ROLE_NAMES = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "eoi": "<eoss>", "boi": "<racm3:break>"}

# what the loader reads of a Hub repo (hub.resolve): the transformers layout (an original one is passed as a folder)
CHAMELEON_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"]

GPT_SKIPPED = ("rope.freqs",)   # a RoPE table in consolidated.pth; gpt.py computes its own
VQ_SKIPPED_PREFIX = "loss."     # vqgan.ckpt's training losses (discriminator, LPIPS), loaded strict=False upstream

# transformers' names -> nano_emu.gpt's (the same Llama names under `model.`: a map that reads as an identity, but
# the whole list, so anything else in a checkpoint is reported)
HF_NAMES = {
    "model.embed_tokens": "embed_tokens",
    "model.layers.{}.input_layernorm": "layers.{}.input_layernorm",
    "model.layers.{}.self_attn.q_proj": "layers.{}.self_attn.q_proj",
    "model.layers.{}.self_attn.k_proj": "layers.{}.self_attn.k_proj",
    "model.layers.{}.self_attn.v_proj": "layers.{}.self_attn.v_proj",
    "model.layers.{}.self_attn.o_proj": "layers.{}.self_attn.o_proj",
    "model.layers.{}.self_attn.q_norm": "layers.{}.self_attn.q_norm",
    "model.layers.{}.self_attn.k_norm": "layers.{}.self_attn.k_norm",
    "model.layers.{}.post_attention_layernorm": "layers.{}.post_attention_layernorm",
    "model.layers.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "model.layers.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "model.layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "model.norm": "norm",
    "lm_head": "lm_head",
}
HF_VQ_PREFIX = "model.vqmodel."

# Meta's original names (chameleon/inference/transformer.py) -> ours; q/k rows and norms are permuted below
ORIGINAL_NAMES = {
    "tok_embeddings": "embed_tokens",
    "layers.{}.attention_norm": "layers.{}.input_layernorm",
    "layers.{}.attention.wq": "layers.{}.self_attn.q_proj",
    "layers.{}.attention.wk": "layers.{}.self_attn.k_proj",
    "layers.{}.attention.wv": "layers.{}.self_attn.v_proj",
    "layers.{}.attention.wo": "layers.{}.self_attn.o_proj",
    "layers.{}.attention.q_normalization": "layers.{}.self_attn.q_norm",
    "layers.{}.attention.k_normalization": "layers.{}.self_attn.k_norm",
    "layers.{}.ffn_norm": "layers.{}.post_attention_layernorm",
    "layers.{}.feed_forward.w1": "layers.{}.mlp.gate_proj",
    "layers.{}.feed_forward.w3": "layers.{}.mlp.up_proj",
    "layers.{}.feed_forward.w2": "layers.{}.mlp.down_proj",
    "norm": "norm",
    "output": "lm_head",
}


def gpt_from_original(tensors: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Meta's layout -> ours. The original code rotates adjacent pairs (x[2i], x[2i+1]) of each head; gpt.py rotates
    (x[i], x[i + d/2]), so wq/wk rows are reordered per head (gpt.interleaved_to_halves). The qk-LayerNorm acts
    before RoPE on the same layout, so its weight and bias get the same reorder (LayerNorm commutes with a
    permutation of its entries), and the one head_dim-wide LayerNorm is repeated for every head."""
    out = {}
    for key, tensor in tensors.items():
        name = rename_or_keep(key, ORIGINAL_NAMES)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = interleaved_to_halves(tensor, cfg.n_head if "q_proj" in name else cfg.n_kv_head)
        elif re.search(r"\.[qk]_norm\.(weight|bias)$", name) and tensor.ndim == 1:
            heads = cfg.n_head if ".q_norm." in name else cfg.n_kv_head
            tensor = interleaved_to_halves(tensor[:, None], 1)[:, 0].expand(heads, -1)   # (heads, head_dim)
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# configs


def gpt_config_hf(text: dict, source: str) -> GPTConfig:
    """transformers' ChameleonConfig fields -> GPTConfig (released values where a field is missing)."""
    if text.get("hidden_act", "silu") != "silu" or text.get("attention_bias") or text.get("mlp_bias"):
        raise ValueError(f"{source}: only SwiGLU without biases is Chameleon's (hidden_act "
                         f"{text.get('hidden_act')!r}, attention_bias {text.get('attention_bias')}, mlp_bias "
                         f"{text.get('mlp_bias')})")
    fields = llama_config_fields(text, source, "Chameleon", extra_names={"swin_norm": "swin_norm"})
    return GPTConfig.chameleon("7B", **fields)


def gpt_config_original(params: dict, vocab_size: int) -> GPTConfig:
    """params.json (Meta's ModelArgs, possibly under "model") -> GPTConfig; the SwiGLU width is Llama's rule."""
    p = params.get("model", params)
    dim, multiple_of = p["dim"], p.get("multiple_of", 256)
    hidden = int((p.get("ffn_dim_multiplier") or 1) * int(8 * dim / 3))   # Llama: 8/3 dim, rounded up below
    theta = float(p.get("rope_theta") or 10000.0)
    return GPTConfig.chameleon("7B", vocab_size=vocab_size, n_layer=p["n_layers"], n_head=p["n_heads"],
                               n_kv_head=p.get("n_kv_heads") or p["n_heads"], dim=dim,
                               intermediate_size=multiple_of * -(-hidden // multiple_of),
                               norm_eps=p.get("norm_eps", 1e-5), rope_theta=theta,
                               max_seq_len=16384 if theta > 10000.0 else 4096, swin_norm=bool(p.get("swin_norm")))


def vq_config(fields: dict, source: str) -> VQConfig:
    """vq_config (transformers) or vqgan.yaml's ddconfig + n_embed/embed_dim (taming) -> VQConfig."""
    get = lambda *names, default=None: next((fields[n] for n in names if fields.get(n) is not None), default)  # noqa: E731
    ch_mult = tuple(get("channel_multiplier", "ch_mult", default=(1, 1, 2, 2, 4)))
    resolution, attn = get("resolution", default=512), get("attn_resolutions", default=[]) or []
    if get("double_latent", "double_z", default=False) or get("out_channels", "out_ch", default=3) != 3:
        raise ValueError(f"{source}: nano_emu.vq needs double_z false and 3 output channels (Chameleon's VQGAN)")
    return VQConfig(ch=get("base_channels", "ch", default=128), ch_mult=ch_mult,
                    num_res_blocks=get("num_res_blocks", default=2),
                    attn_levels=tuple(l for l in range(len(ch_mult)) if resolution // 2 ** l in attn),
                    embed_dim=get("embed_dim", default=256), codebook_size=get("num_embeddings", "n_embed", default=8192),
                    temporal_factor=1, z_channels=get("latent_channels", "z_channels", default=256),
                    spatial_norm=False, norm_groups=32, l2_norm=False,
                    in_channels=get("in_channels", default=3))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer -> layout


def chameleon_layout(tokenizer: JSONTokenizer, vq: VQConfig, source: str, image_size: int = CHAMELEON_IMAGE_SIZE,
                     vocab_size: int | None = None) -> Layout:
    """The roles by name, and the image tokens by their IMGIMG names: "IMGIMG" + the code with letters A-J for the
    digits 0-9 + one trailing character (VocabTranslation in the reference). Layout needs image code i at BPE id
    first_visual + i for every code, which the release satisfies (first_visual 4); anything else is refused."""
    vocab = tokenizer.vocab
    missing = [name for name in ROLE_NAMES.values() if name not in vocab]
    if missing:
        raise ValueError(f"{source} lacks Chameleon's special tokens {missing}")
    digits = str.maketrans("ABCDEFGHIJ", "0123456789")
    code_to_id = {int(name[len("IMGIMG"):-1].translate(digits)): i for name, i in vocab.items()
                  if name.startswith("IMGIMG")}
    first = code_to_id.get(0)
    if sorted(code_to_id) != list(range(vq.codebook_size)) or any(code_to_id[c] != first + c for c in code_to_id):
        raise ValueError(f"{source}: its IMGIMG tokens are not the VQ's {vq.codebook_size} codes at consecutive ids "
                         f"({len(code_to_id)} image tokens, code 0 at id {first})")
    roles = {role: vocab[name] for role, name in ROLE_NAMES.items()}
    grid = image_size // vq.spatial_factor
    layout = Layout.chameleon(**roles, first_visual=first, codebook_size=vq.codebook_size, image_grid=(grid, grid))
    return replace(layout, answer_forbidden=not_text_ids(vocab, vocab_size or tokenizer.n_vocab, layout))


def not_text_ids(vocab: dict[str, int], vocab_size: int, layout: Layout) -> tuple[int, ...]:
    """The ids the reference's text decoder never writes (TextDecoder in chameleon/inference/chameleon.py allows
    only EOS and VocabInfo.text_tokens: every vocabulary entry but the IMGIMG codes and the specials, a special
    being any name that starts with "<" other than "<" itself), beyond those Layout.answer_mask already forbids:
    <unk>, the <reserved...> block, <image>, ids the tokenizer does not name."""
    text = {i for name, i in vocab.items()
            if not name.startswith("IMGIMG") and (name == "<" or not name.startswith("<"))}
    allowed_before = layout.answer_mask(vocab_size)
    return tuple(i for i in range(vocab_size) if allowed_before[i] and i not in text and i != layout.eos)


# ---------------------------------------------------------------------------------------------------------------
# the loader


def load_chameleon(path: str | Path, tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, image_size: int = CHAMELEON_IMAGE_SIZE) -> Pipeline:
    """A Chameleon / Anole folder in the transformers or the original layout (see the module docstring) -> a
    Pipeline in eval mode, the GPT in `dtype` (bf16 as released), the VQ in fp32. tokenizer_dir: the original
    layout's tokenizer/ folder, if it is neither inside `path` nor at path/../../tokenizer. image_size: pixels per
    side of drawn and read images (512 as released; tiny test models use less). path may be a Hugging Face Hub
    id of a transformers-layout repo ("leloy/Anole-7b-v0.1-hf", "facebook/chameleon-7b@<commit>"; hub.py)."""
    folder = resolve(path, CHAMELEON_FILES)
    if not folder.is_dir():
        raise FileNotFoundError(f"Chameleon folder {folder} does not exist (or is not a folder)")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", "Chameleon folder")
        if config.get("model_type") != "chameleon":
            raise ValueError(f"{folder / 'config.json'} describes a model of model_type "
                             f"{config.get('model_type')!r}, not Chameleon ('chameleon')")
        gpt_cfg = gpt_config_hf(config, str(folder / "config.json"))
        vq_cfg = vq_config(config.get("vq_config") or {}, f"{folder / 'config.json'} vq_config")
        tokenizer = JSONTokenizer(_require(folder / "tokenizer.json", "the transformers layout"))
        checkpoint = open_checkpoint(folder)   # headers only
        vq_file, vq_keys = checkpoint, [k for k in checkpoint.shapes if k.startswith(HF_VQ_PREFIX)]
        gpt_keys = [k for k in checkpoint.shapes if not k.startswith(HF_VQ_PREFIX)]
        to_gpt = lambda t: {rename_or_keep(k, HF_NAMES): v for k, v in t.items()}  # noqa: E731
        to_vq = lambda t: {k[len(HF_VQ_PREFIX):]: v for k, v in t.items()}  # noqa: E731
        source = f"{folder} (transformers layout)"
    elif (folder / "consolidated.pth").is_file() or (folder / "params.json").is_file():
        if list(folder.glob("consolidated.0*.pth")):
            raise ValueError(f"{folder} holds tensor-parallel shards (consolidated.00.pth, ...; the 30B): nano_emu "
                             f"does not merge them; convert with transformers' convert_chameleon_weights_to_hf.py")
        params = read_json(folder / "params.json", "Chameleon original-layout folder")
        checkpoint = open_checkpoint(_require(folder / "consolidated.pth", "the original layout"))
        if "tok_embeddings.weight" not in checkpoint.shapes:
            raise ValueError(f"{folder / 'consolidated.pth'} is not a Chameleon checkpoint; it holds tensors such as "
                             f"{sorted(checkpoint.shapes)[:4]}")
        gpt_cfg = gpt_config_original(params, checkpoint.shapes["tok_embeddings.weight"][0])
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else next(
            (d for d in (folder / "tokenizer", folder.parent.parent / "tokenizer") if d.is_dir()), None)
        if tok_dir is None:
            raise FileNotFoundError(f"no tokenizer/ folder (vqgan.ckpt, vqgan.yaml, text_tokenizer.json) in {folder} "
                                    f"or {folder.parent.parent}: pass tokenizer_dir (sample.py --tokenizer-dir)")
        vq_cfg = vq_config(_read_vqgan_yaml(_require(tok_dir / "vqgan.yaml", "the original layout")), str(tok_dir))
        tokenizer = JSONTokenizer(_require(tok_dir / "text_tokenizer.json", "the original layout"))
        vq_file = open_checkpoint(_require(tok_dir / "vqgan.ckpt", "the original layout"))
        vq_keys = [k for k in vq_file.shapes if not k.startswith(VQ_SKIPPED_PREFIX)]
        gpt_keys = [k for k in checkpoint.shapes if k not in GPT_SKIPPED]
        to_gpt = lambda t: gpt_from_original(t, gpt_cfg)  # noqa: E731
        to_vq = dict
        source = f"{folder} (original layout)"
    else:
        raise FileNotFoundError(f"{folder} is neither a transformers Chameleon folder (config.json, *.safetensors, "
                                f"tokenizer.json) nor an original one (consolidated.pth, params.json)")
    if tokenizer.n_vocab > gpt_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} ids, the model {gpt_cfg.vocab_size}: not a pair")
    layout = chameleon_layout(tokenizer, vq_cfg, str(folder), image_size, gpt_cfg.vocab_size)
    has_decoder = any(k.startswith("decoder.") for k in to_vq({k: None for k in vq_keys}))
    with torch.device("meta"):
        gpt, vq = GPT(gpt_cfg), VQModel(vq_cfg, decoder=has_decoder)
    check_strict(gpt, checkpoint, gpt_keys, to_gpt, source)   # both checked before a tensor is read
    load_strict(vq, vq_file, to_vq, f"{source} (VQ)", keys=vq_keys, device=device)
    load_strict(gpt, checkpoint, to_gpt, source, keys=gpt_keys, device=device, dtype=dtype)
    return chameleon_pipeline(gpt, vq, tokenizer, layout, image_size)


def chameleon_pipeline(gpt: GPT, vq: VQModel, tokenizer, layout: Layout,
                       image_size: int = CHAMELEON_IMAGE_SIZE) -> Pipeline:
    """A Chameleon-style GPT and VQ (loaded, or random for benchmarks) with the release's conventions."""
    template = CHAMELEON_CHAT_TEMPLATE if "<reserved08706>" in getattr(tokenizer, "vocab", {}) else "{question}{image}"
    return Pipeline(gpt.eval(), vq.eval(), tokenizer, layout, image_area=image_size * image_size,
                    chat_template=template, resize={"square": image_size}, max_aspect_ratio=1.0,
                    sampling=CHAMELEON_SAMPLING, guidance=CHAMELEON_GUIDANCE)


def _require(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({layout} needs it)")
    return path


def _read_vqgan_yaml(path: Path) -> dict:
    """vqgan.yaml's model.params: ddconfig's fields with n_embed and embed_dim beside them."""
    try:
        import yaml
    except ImportError:
        raise ImportError("reading vqgan.yaml needs PyYAML: pip install nano_emu[weights]") from None
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["params"]
        return {**params["ddconfig"], "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a taming VQGAN config (model.params.ddconfig, n_embed, embed_dim): {e!r}") \
            from None
