"""Load LlamaGen's released class-to-image weights (a c2i GPT + the VQ-16 tokenizer) into a Pipeline.

    pipe = load_llamagen("c2i_B_256.pt", "vq_ds16_c2i.pt")     # or their .safetensors forms
    images = pipe.draw(["207"] * 4, seed=0)                    # 4 golden retrievers, 256x256 (or "golden retriever")

LlamaGen ("Autoregressive Model Beats Diffusion", arXiv 2406.06525, github.com/FoundationVision/LlamaGen) is a
Llama GPT that continues a class token with 16x16 (256 px) or 24x24 (384 px) codes of its VQGAN. Both models are
presets of nano_emu's own modules (GPTConfig.llamagen, VQConfig.llamagen; docs/families.md lists the switches); this
file holds only what is particular to the release: the name maps, the config read off the checkpoint's shapes, and
the demo's prompt and sampling conventions (class token, null class as the unconditional branch, CFG 4.0 on raw
logits, top-k 2000, temperature 1).

Files: the GPTs come as DDP checkpoints {"model": state_dict} (B, L, XL) or FSDP raw state dicts (XXL, 3B); the VQs
as {"model": state_dict}. All are read by weights.py with torch.load(weights_only=True) (no pickled code runs) and
memory-mapped, so every name and shape is checked before the tensors are read. Two keys are skipped on purpose:
`freqs_cis` (a RoPE table some GPT checkpoints carry; gpt.py computes its own) and `quantize.codebook_used` (a
training-only record of the last 65536 codes used). The model size is read off the shapes, the image size off the
released file name (c2i_B_256.pt) unless given.
"""

import re
from pathlib import Path

import torch
from torch import Tensor

from .gpt import GPT, LLAMAGEN_SIZES, GPTConfig, interleaved_to_halves
from .hub import resolve
from .layout import Layout
from .pipeline import Pipeline
from .sampler import Guidance, Sampling
from .vq import VQConfig, VQModel
from .weights import check_strict, load_strict, open_checkpoint, rename_or_keep

# the demo's conventions (autoregressive/sample/sample_c2i.py): guidance on raw logits at 4.0 in every step
LLAMAGEN_GUIDANCE = Guidance(cfg_scale=4.0, cfg_on="logits", cfg_interval=-1)
LLAMAGEN_SAMPLING = Sampling(temperature=1.0, top_k=2000)

GPT_SKIPPED = ("freqs_cis",)                 # a stray RoPE table in some released GPT checkpoints
VQ_SKIPPED = ("quantize.codebook_used",)     # LlamaGen's training-only usage tracker (a registered buffer)

# LlamaGen GPT modules -> nano_emu.gpt's (Emu3/Llama names). The fused `layers.{}.attention.wqkv` is split below.
GPT_NAMES = {
    "tok_embeddings": "embed_tokens",
    "cls_embedding.embedding_table": "cls_embedding",
    "layers.{}.attention_norm": "layers.{}.input_layernorm",
    "layers.{}.attention.wo": "layers.{}.self_attn.o_proj",
    "layers.{}.ffn_norm": "layers.{}.post_attention_layernorm",
    "layers.{}.feed_forward.w1": "layers.{}.mlp.gate_proj",
    "layers.{}.feed_forward.w3": "layers.{}.mlp.up_proj",
    "layers.{}.feed_forward.w2": "layers.{}.mlp.down_proj",
    "norm": "norm",
    "output": "lm_head",
}


def vq_names(cfg: VQConfig) -> dict[str, str]:
    """LlamaGen VQ module -> nano_emu.vq's (Emu3/taming names), every module of a VQ with this config spelled out.
    LlamaGen's decoder appends its levels lowest resolution first, so its `decoder.conv_blocks.i` is our level
    n-1-i, and its `mid` is a list [res, attn, res]."""
    n = len(cfg.ch_mult)
    names = {f"{part}.{x}": f"{part}.{x}" for part in ("encoder", "decoder") for x in ("conv_in", "norm_out", "conv_out")}
    names |= {f"{part}.mid.{i}": f"{part}.mid.{ours}" for part in ("encoder", "decoder")
              for i, ours in enumerate(("block_1", "attn_1", "block_2"))}
    names |= {"quantize.embedding": "quantize.embedding", "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for level in range(n):
        attn = level in cfg.attn_levels
        for j in range(cfg.num_res_blocks):
            names[f"encoder.conv_blocks.{level}.res.{j}"] = f"encoder.down.{level}.block.{j}"
            if attn:
                names[f"encoder.conv_blocks.{level}.attn.{j}"] = f"encoder.down.{level}.attn.{j}"
        names[f"encoder.conv_blocks.{level}.downsample"] = f"encoder.down.{level}.downsample"
        theirs = n - 1 - level
        for j in range(cfg.num_res_blocks + 1):
            names[f"decoder.conv_blocks.{theirs}.res.{j}"] = f"decoder.up.{level}.block.{j}"
            if attn:
                names[f"decoder.conv_blocks.{theirs}.attn.{j}"] = f"decoder.up.{level}.attn.{j}"
        names[f"decoder.conv_blocks.{theirs}.upsample"] = f"decoder.up.{level}.upsample"
    return names


def gpt_from_llamagen(tensors: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    out = {}
    for key, tensor in tensors.items():
        fused = re.fullmatch(r"layers\.(\d+)\.attention\.wqkv\.weight", key)
        sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        if fused and tensor.shape[0] == sum(sizes):
            q, k, v = tensor.split(sizes)   # (rows, dim) each: wqkv stacks q, k, v along the output rows
            attn = f"layers.{fused[1]}.self_attn"
            out[f"{attn}.q_proj.weight"] = interleaved_to_halves(q, cfg.n_head)
            out[f"{attn}.k_proj.weight"] = interleaved_to_halves(k, cfg.n_kv_head)
            out[f"{attn}.v_proj.weight"] = v
        else:
            out[rename_or_keep(key, GPT_NAMES)] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# configs from the checkpoints' shapes


def layer_count(shapes: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def wrong_file(shapes: dict, source: str, expected: str) -> ValueError:
    if expected != "gpt" and "tok_embeddings.weight" in shapes:
        return ValueError(f"{source} is a LlamaGen GPT checkpoint, not the VQ tokenizer: pass it as gpt_ckpt "
                          f"(sample.py --llamagen), and vq_ds16_c2i.pt as vq_ckpt (--vq)")
    if expected != "vq" and "quantize.embedding.weight" in shapes:
        return ValueError(f"{source} is a LlamaGen VQ tokenizer checkpoint, not the GPT: pass it as vq_ckpt (--vq), "
                          f"and a c2i_*.pt GPT as gpt_ckpt (--llamagen)")
    if "cls_embedding.cap_proj.fc1.weight" in shapes:
        return ValueError(f"{source} is a LlamaGen text-to-image GPT; only the class-to-image (c2i) ones load")
    what = "GPT (c2i_*.pt)" if expected == "gpt" else "VQ tokenizer (vq_ds16_c2i.pt / vq_ds8_c2i.pt)"
    return ValueError(f"{source} is not a LlamaGen {what} checkpoint; it holds {len(shapes)} tensors such as "
                      f"{sorted(shapes)[:4]}")


def gpt_config(shapes: dict, source: str, grid: int, gpt_model: str | None = None,
               n_head: int | None = None) -> GPTConfig:
    """The preset whose (layers, width) the checkpoint has; `gpt_model` ("GPT-B", ...) must agree with it. A size
    LlamaGen never released (e.g. a test's tiny model) needs n_head, which shapes cannot tell."""
    if "tok_embeddings.weight" not in shapes or "cls_embedding.embedding_table.weight" not in shapes:
        raise wrong_file(shapes, source, "gpt")
    vocab_size, dim = shapes["tok_embeddings.weight"]
    n_layer = layer_count(shapes, "layers.")
    found = next((name for name, (layers, _, width) in LLAMAGEN_SIZES.items() if (layers, width) == (n_layer, dim)),
                 None)
    if gpt_model is not None and gpt_model not in LLAMAGEN_SIZES:
        raise ValueError(f"unknown LlamaGen size {gpt_model!r}; the released ones are {', '.join(LLAMAGEN_SIZES)}")
    if gpt_model is not None and gpt_model != found:
        raise ValueError(f"{source} holds a {found or f'{n_layer}-layer, {dim}-wide'} GPT, not {gpt_model}")
    # the class table has a null row (index num_classes) because the release trained with class dropout 0.1
    fields = dict(vocab_size=vocab_size, num_classes=shapes["cls_embedding.embedding_table.weight"][0] - 1)
    if found is None:
        if n_head is None:
            sizes = ", ".join(f"{name} ({layers} layers, width {width})"
                              for name, (layers, _, width) in LLAMAGEN_SIZES.items())
            raise ValueError(f"{source}: a GPT of {n_layer} layers and width {dim} is none of the released sizes "
                             f"({sizes}); pass n_head for a model of your own")
        fields |= dict(n_layer=n_layer, dim=dim, n_head=n_head, n_kv_head=n_head,
                       intermediate_size=shapes.get("layers.0.feed_forward.w1.weight", (0,))[0])
    return GPTConfig.llamagen(found or "GPT-B", grid, **fields)


def vq_config(shapes: dict, source: str) -> VQConfig:
    """LlamaGen's VQ structure read off the shapes: VQ-16 and VQ-8 give VQConfig.llamagen(16) / (8)."""
    if "quantize.embedding.weight" not in shapes or "encoder.conv_in.weight" not in shapes:
        raise wrong_file(shapes, source, "vq")
    ch, n = shapes["encoder.conv_in.weight"][0], layer_count(shapes, "encoder.conv_blocks.")
    codebook_size, embed_dim = shapes["quantize.embedding.weight"]
    return VQConfig(ch=ch, ch_mult=tuple(shapes.get(f"encoder.conv_blocks.{level}.res.0.conv1.weight", (0,))[0] // ch
                                         for level in range(n)),
                    num_res_blocks=layer_count(shapes, "encoder.conv_blocks.0.res."),
                    attn_levels=tuple(level for level in range(n)
                                      if f"encoder.conv_blocks.{level}.attn.0.q.weight" in shapes),
                    embed_dim=embed_dim, codebook_size=codebook_size, temporal_factor=1,
                    z_channels=shapes["encoder.conv_out.weight"][0], spatial_norm=False, norm_groups=32, l2_norm=True)


def image_size_from_name(path: Path) -> int | None:
    match = re.search(r"_(\d{3})\.(pt|pth|bin|safetensors)$", path.name)   # c2i_B_256.pt, c2i_3B_384.pt
    return int(match[1]) if match else None


# ---------------------------------------------------------------------------------------------------------------
# class labels and the loader


class ClassLabels:
    """The 'tokenizer' of a class-conditional model: a class index or name <-> its class token (GPT input id
    first_class_id + class). The empty string is the null class, CFG's unconditional branch."""

    def __init__(self, first_class_id: int, num_classes: int):
        self.first_class_id, self.num_classes = first_class_id, num_classes
        self.names = [str(c) for c in range(num_classes)]
        if num_classes == 1000:   # ImageNet-1k, WordNet lemmas in class order (the first one is the label)
            lines = (Path(__file__).parent / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
            self.names = [line.split(",")[0] for line in lines]
            self._by_name = {lemma.strip().lower(): c for c, line in enumerate(lines) for lemma in line.split(",")}
        else:
            self._by_name = {}

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        if text == "":
            return [self.first_class_id + self.num_classes]
        if text.isdigit() and int(text) < self.num_classes:
            return [self.first_class_id + int(text)]
        if text.lower() in self._by_name:
            return [self.first_class_id + self._by_name[text.lower()]]
        raise ValueError(f"unknown class {text!r}: give an index in [0, {self.num_classes}) or an ImageNet class "
                         f"name such as 'golden retriever'")

    def decode(self, ids: list[int]) -> str:
        return ", ".join("null class" if i == self.first_class_id + self.num_classes
                         else self.names[i - self.first_class_id] for i in ids)


def load_llamagen(gpt_ckpt: str | Path, vq_ckpt: str | Path, gpt_model: str | None = None,
                  image_size: int | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, n_head: int | None = None) -> Pipeline:
    """A released c2i GPT checkpoint + a VQ checkpoint -> a Pipeline in eval mode (GPT in `dtype`, VQ in fp32 as
    in the demo). gpt_model: "GPT-B" ... "GPT-3B", checked against the shapes. image_size: 256 or 384 (default: from
    the file name, c2i_B_256.pt); the grid is image_size / the VQ's downsampling. Either file may be a Hugging Face
    Hub id of a file: "FoundationVision/LlamaGen/c2i_B_256.pt", "FoundationVision/LlamaGen@<commit>/vq_ds16_c2i.pt"
    (hub.py); only that file is fetched."""
    gpt_path, vq_path = resolve(gpt_ckpt, None), resolve(vq_ckpt, None)
    gpt_file, vq_file = open_checkpoint(gpt_path), open_checkpoint(vq_path)   # names and shapes only
    if "tok_embeddings.weight" in vq_file.shapes and "quantize.embedding.weight" in gpt_file.shapes:
        raise ValueError(f"the two checkpoints are swapped: {gpt_path} is the VQ tokenizer and {vq_path} the GPT "
                         f"(sample.py: --llamagen <GPT> --vq <VQ>)")
    vq_cfg = vq_config(vq_file.shapes, str(vq_path))
    if not {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"} <= gpt_file.shapes.keys():
        raise wrong_file(gpt_file.shapes, str(gpt_path), "gpt")   # what the file is, before asking its image size
    image_size = image_size or image_size_from_name(gpt_path)
    if image_size is None:
        raise ValueError(f"cannot tell the image size from the file name {gpt_path.name} (the released ones end in "
                         f"_256 or _384): pass image_size (sample.py --image-size)")
    if image_size % vq_cfg.spatial_factor:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ's {vq_cfg.spatial_factor} pixels per code")
    gpt_cfg = gpt_config(gpt_file.shapes, str(gpt_path), image_size // vq_cfg.spatial_factor, gpt_model, n_head)
    if gpt_cfg.vocab_size != vq_cfg.codebook_size:
        raise ValueError(f"{gpt_path} predicts {gpt_cfg.vocab_size} image tokens, {vq_path} has "
                         f"{vq_cfg.codebook_size} codes: they are not a pair")
    with torch.device("meta"):
        gpt, vq = GPT(gpt_cfg), VQModel(vq_cfg)
    names = vq_names(vq_cfg)
    to_vq = lambda tensors: {rename_or_keep(k, names): t for k, t in tensors.items()}  # noqa: E731
    to_gpt = lambda tensors: gpt_from_llamagen(tensors, gpt_cfg)  # noqa: E731
    vq_keys = [k for k in vq_file.shapes if k not in VQ_SKIPPED]
    gpt_keys = [k for k in gpt_file.shapes if k not in GPT_SKIPPED]
    check_strict(gpt, gpt_file, gpt_keys, to_gpt, f"{gpt_path} (GPT)")   # both checked before any tensor is read
    load_strict(vq, vq_file, to_vq, f"{vq_path} (VQ)", keys=vq_keys, device=device)
    load_strict(gpt, gpt_file, to_gpt, f"{gpt_path} (GPT)", keys=gpt_keys, device=device, dtype=dtype)
    return llamagen_pipeline(gpt, vq)


def llamagen_pipeline(gpt: GPT, vq: VQModel) -> Pipeline:
    """A class-to-image GPT and its VQ (loaded, or random for benchmarks) with the demo's conventions."""
    cfg, side = gpt.config, gpt.config.rope_2d_grid * vq.cfg.spatial_factor
    return Pipeline(gpt.eval(), vq.eval(), ClassLabels(cfg.vocab_size, cfg.num_classes), Layout.llamagen(cfg.vocab_size),
                    image_area=side * side, max_aspect_ratio=1.0, sampling=LLAMAGEN_SAMPLING,
                    guidance=LLAMAGEN_GUIDANCE)
