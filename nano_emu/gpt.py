"""A compact Llama-style decoder: the one next-token model behind text, images and video.

Emu3's language model is a plain Llama-2/3 decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU,
no biases, untied output head); only its vocabulary is special, because it also holds the 32768 visual tokens.
Module and parameter names follow the Llama/Emu3 checkpoints (`self_attn.q_proj`, `mlp.gate_proj`, ...) so the
released weights map onto this file with a literal name map (weights.py).

One `forward` does two jobs:
- training / full recompute (no cache): logits for every position of a (B, T) batch;
- decoding with a static KV cache (gpt-fast): a `KVCache` is allocated once for (batch, length) by whoever
  decodes (engine.Engine owns it); each call writes its keys/values at the cache slots `input_pos` and returns
  logits for the last position only (or for every position of a speculative window), so a 184622-wide
  vocabulary never materialises for a whole 8k-token prompt. The model itself holds no decoding state.
Left-padded batches mark their padding (1 = token, 0 = padding): padded keys are masked out and positions count
only real tokens (`cumsum(mask) - 1`), as Emu3 does, so each row gives what it would give alone. Without a cache
that is `forward(..., attention_mask=)`; with one it is `cache.start(prompt_mask)`, which also computes the
positions and rotary tables of every slot once, so a decode step does no position arithmetic at all.

LlamaGen's class-conditional GPT is the same decoder with two switches (docs/families.md): `num_classes` adds a class
embedding table whose rows are fed as input ids vocab_size + class (the start token; the extra last row is the null
class CFG uses), and `rope_2d_grid` rotates image token k by its row on one half of each head and its column on the
other, with the condition token's rotation zeroed exactly as released. Its names are mapped in llamagen.py.

Chameleon / Anole (the CM3Leon line) is the same decoder with two more switches: `qk_norm` applies a LayerNorm with
weight and bias to every head of q and k before RoPE (Chameleon's fix for logit drift in mixed-modal training), and
`swin_norm` (the 30B) moves each RMSNorm from the branch input to the branch output. Its names are mapped in
chameleon.py, which also permutes the original checkpoints' interleaved RoPE rows to this file's rotate_half layout
(interleaved_to_halves, beside apply_rope; LlamaGen's loader uses it too).

References: Emu3 (github.com/baaivision/Emu3, emu3/mllm/modeling_emu3.py), Llama (github.com/meta-llama/llama),
gpt-fast (github.com/pytorch-labs/gpt-fast) for the static cache, nanoGPT for the manual attention next to SDPA,
LlamaGen (github.com/FoundationVision/LlamaGen, autoregressive/models/gpt.py) for the class token and 2-D RoPE,
Chameleon (arXiv 2405.09818, github.com/facebookresearch/chameleon chameleon/inference/transformer.py) for qk-norm
and swin-norm.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 1288
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4           # < n_head: grouped-query attention (Emu3: 8 kv heads for 32 query heads)
    dim: int = 256
    intermediate_size: int = 704  # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512       # the context the model is meant for; longer inputs raise a clear error
    sdpa: bool = True            # False: the readable manual attention below (same math, for stepping through)
    num_classes: int = 0         # LlamaGen: > 0 adds `cls_embedding` (num_classes + 1 rows, the last the null class);
    #                              input id vocab_size + c is class c. Outputs stay over the vocab_size tokens
    rope_2d_grid: int = 0        # LlamaGen: > 0 = 2-D RoPE over a grid this wide, after n_cond_tokens condition
    n_cond_tokens: int = 1       # tokens, which are zero-rotated; 0 = plain 1-D RoPE over positions
    qk_norm: bool = False        # Chameleon: LayerNorm (weight + bias, one per head) on q and k before RoPE
    swin_norm: bool = False      # Chameleon-30B: x + norm(attn(x)), then h + norm(mlp(h)) (norms on the branch output)

    def __post_init__(self):
        assert self.dim % self.n_head == 0, f"dim {self.dim} must be divisible by n_head {self.n_head}"
        assert self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}"
        self.head_dim = self.dim // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int, **overrides) -> "GPTConfig":
        """A few million parameters: trains on a 2-core CPU in minutes (train_tiny.py)."""
        return cls(**{**dict(vocab_size=vocab_size, n_layer=4, n_head=4, n_kv_head=2, dim=256,
                             intermediate_size=704, rope_theta=10000.0, max_seq_len=512), **overrides})

    @classmethod
    def emu3_8b(cls, **overrides) -> "GPTConfig":
        """The released Emu3-Gen / Emu3-Chat numbers (config.json): 8.49B parameters.
        max_seq_len is 9216 for Gen and 131072 for Chat; the loader reads it from config.json."""
        return cls(**{**dict(vocab_size=184622, n_layer=32, n_head=32, n_kv_head=8, dim=4096,
                             intermediate_size=14336, norm_eps=1e-5, rope_theta=1e6, max_seq_len=9216), **overrides})

    @classmethod
    def llamagen(cls, size: str = "GPT-B", grid: int = 16, **overrides) -> "GPTConfig":
        """LlamaGen's class-to-image GPTs (c2i_{B,L,XL,XXL,3B}_{256,384}.pt) for a grid x grid image (16: 256 px with
        VQ-16, 24: 384 px): 16384 image tokens, 1000 ImageNet classes, SwiGLU width 8/3 dim rounded up to 256."""
        if size not in LLAMAGEN_SIZES:
            raise ValueError(f"unknown LlamaGen size {size!r}; the released ones are {', '.join(LLAMAGEN_SIZES)}")
        n_layer, n_head, dim = LLAMAGEN_SIZES[size]
        ffn = -(-int(2 * 4 * dim / 3) // 256) * 256
        return cls(**{**dict(vocab_size=16384, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, dim=dim,
                             intermediate_size=ffn, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1 + grid * grid,
                             num_classes=1000, rope_2d_grid=grid, n_cond_tokens=1), **overrides})


    @classmethod
    def chameleon(cls, size: str = "7B", **overrides) -> "GPTConfig":
        """facebook/chameleon-7b and -30b (Anole-7b is the 7B): 65536 tokens (text BPE + 8192 image codes), qk-norm,
        context 4096, RoPE theta 1e4; the 30B adds grouped-query attention and swin-norm (CHAMELEON_SIZES)."""
        if size not in CHAMELEON_SIZES:
            raise ValueError(f"unknown Chameleon size {size!r}; the released ones are {', '.join(CHAMELEON_SIZES)}")
        n_layer, n_head, n_kv_head, dim, ffn, swin = CHAMELEON_SIZES[size]
        return cls(**{**dict(vocab_size=65536, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, dim=dim,
                             intermediate_size=ffn, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                             qk_norm=True, swin_norm=swin), **overrides})


# Chameleon's released LLMs: (n_layer, n_head, n_kv_head, dim, SwiGLU width, swin_norm). The 30B numbers are the
# reference notes' (params.json of the 30B was not at hand): check them against its config.json when you have it
CHAMELEON_SIZES = {"7B": (32, 32, 32, 4096, 11008, False), "30B": (48, 64, 8, 8192, 22016, True)}

# LlamaGen's GPT_models that have released c2i weights: (n_layer, n_head, dim); the 3B has head_dim 100
LLAMAGEN_SIZES = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
                  "GPT-XXL": (48, 24, 1536), "GPT-3B": (24, 32, 3200)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the statistics are computed in float32 even when the model runs in bf16 (as Emu3/Llama do), the
        # result is cast back before the weight multiplies it, which is the released order of operations.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel: a decode step is ~100 small ops on a CPU,
        # and this one was seven of them, five times per layer pair
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's qk-norm: LayerNorm over head_dim with a weight and bias for every head, (n_heads, head_dim).
    The original code keeps one LayerNorm per tensor-parallel shard shared by that shard's heads; transformers (and
    chameleon.py) repeat it per head, so the statistics are per head and the affine part is per head. eps 1e-5."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x):   # x (B, T, n_heads, head_dim)
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight + self.bias


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(B, T) integer positions -> (B, T, dim/2) rotation angles, one frequency per pair of a dim-wide vector."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    return positions[..., None].float() * inv_freq


def rope_cos_sin(positions: torch.Tensor, config: GPTConfig, dtype: torch.dtype):
    """cos/sin tables for integer `positions` (B, T), computed on the fly (cheap, and any position works)."""
    if config.rope_2d_grid == 0:
        freqs = rope_angles(positions, config.head_dim, config.rope_theta)                 # (B, T, head_dim/2)
    else:   # LlamaGen: image token k = position - n_cond_tokens sits at (k // grid, k % grid); the first half
        #     of the pairs turns with its row, the second with its column, each with half_dim's frequencies
        k = positions - config.n_cond_tokens
        half = config.head_dim // 2
        freqs = torch.cat([rope_angles(k.div(config.rope_2d_grid, rounding_mode="floor"), half, config.rope_theta),
                           rope_angles(k % config.rope_2d_grid, half, config.rope_theta)], dim=-1)
    angles = torch.cat([freqs, freqs], dim=-1)          # (B, T, head_dim): the "rotate_half" layout
    cos, sin = angles.cos(), angles.sin()
    if config.rope_2d_grid:
        # released quirk: the condition positions get cos = sin = 0, so their queries and keys are ZEROED (not left
        # unrotated); their values still flow. Reproduced because the released weights were trained with it.
        is_cond = (positions < config.n_cond_tokens)[..., None]
        cos, sin = cos.masked_fill(is_cond, 0.0), sin.masked_fill(is_cond, 0.0)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    # HF/Emu3 convention: the two halves of the head dimension are rotated as pairs (x_i, x_{i+d/2}),
    # not adjacent (x_{2i}, x_{2i+1}) as in Meta's Llama code; the released weights are laid out for this.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]    # cos/sin (B, 1, T, head_dim) broadcast over heads


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows in Meta's RoPE layout -> apply_rope's. Meta's Llama code (and LlamaGen's, Chameleon's
    original checkpoints) rotates adjacent pairs (x[2i], x[2i+1]) of each head; apply_rope rotates (x[i], x[i + d/2])
    (transformers' rotate_half). Reordering each head's rows as [even rows, odd rows] turns one into the other:
    q.k is unchanged, pair i keeps its angle."""
    head_dim = weight.shape[0] // n_heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(weight.device)
    return weight.view(n_heads, head_dim, -1)[:, order].reshape(weight.shape)   # (n_heads * head_dim, dim)


class KVCache:
    """Static KV cache (gpt-fast) for one batch of sequences: the keys and values of every layer, which slots hold
    real tokens, and the rotary cos/sin of every slot. Allocated once for (batch_size, max_len) and written in place
    at `input_pos`, so a decode step always sees the same shapes and addresses (compile / CUDA-graph friendly).

    Its owner is whoever decodes (engine.Engine keeps one across calls and drops it on release()); the GPT only
    reads and writes the cache it is handed, so nothing is left hanging on the modules after generation."""

    def __init__(self, config: "GPTConfig", batch_size: int, max_len: int, dtype=torch.float32, device=None):
        if max_len > config.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of "
                             f"{config.max_seq_len} (GPTConfig.max_seq_len); shorten the prompt or the output")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # layer i writes k[i]: (B, Hkv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.arange(max_len, device=device)                           # (S,)
        self.is_token = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)   # False on padding
        self.cos = torch.zeros(batch_size, max_len, config.head_dim, dtype=dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.start()

    @staticmethod
    def nbytes(config: "GPTConfig", batch_size: int, max_len: int, dtype=torch.float32) -> int:
        """What __init__ allocates, in bytes, before allocating it: keys and values, rotary tables, the masks."""
        element = torch.empty((), dtype=dtype).element_size()
        floats = 2 * config.n_layer * batch_size * config.n_kv_head * max_len * config.head_dim   # k, v
        floats += 2 * batch_size * max_len * config.head_dim                                         # cos, sin
        return floats * element + batch_size * max_len + 8 * max_len                                 # is_token, slots

    def start(self, prompt_mask: torch.Tensor | None = None) -> None:
        """Begin new sequences. prompt_mask (B, L): 1 on the prompt's tokens, 0 on its left padding, for the
        first L slots; every later slot will hold a generated token. Positions count real tokens only, so they
        and their rotary tables are known for every slot now. Tensors are updated in place: a compiled or
        CUDA-graphed step keeps pointing at them."""
        self.is_token.fill_(True)
        if prompt_mask is not None:
            self.is_token[:, :prompt_mask.size(1)] = prompt_mask.bool()
        positions = (self.is_token.long().cumsum(-1) - 1).clamp(min=0)              # (B, S)
        cos, sin = rope_cos_sin(positions, self.config, self.cos.dtype)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def mark_static(self) -> None:
        """Tell torch.compile these buffers never move, so CUDA graphs may write them in place."""
        for buffer in (self.k, self.v, self.slots, self.is_token, self.cos, self.sin):
            torch._dynamo.mark_static_address(buffer)


def manual_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v written out, with the softmax in float32 as Emu3's eager path.
    q (B, H, T, D), k/v (B, H, S, D) with kv heads already repeated; mask (B, 1, T, S) bool or None = causal."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, H, T, S)
    if mask is None:
        T, S = q.size(-2), k.size(-2)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v                                              # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = HeadLayerNorm(config.n_head, config.head_dim)
            self.k_norm = HeadLayerNorm(config.n_kv_head, config.head_dim)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)                      # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)                   # (B, T, Hkv, D)
        if self.config.qk_norm:   # Chameleon: per-head LayerNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                    # (B, H, T, D), (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:   # this layer's (B, Hkv, S, D) buffers: write the new slots, attend over all
            k_cache, v_cache = kv_cache
            k, v = k_cache.index_copy_(2, input_pos, k), v_cache.index_copy_(2, input_pos, v)
        if self.config.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_head != self.n_kv_head)
        else:
            groups = self.n_head // self.n_kv_head   # each kv head serves `groups` query heads
            y = manual_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.swin_norm = config.swin_norm

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        if self.swin_norm:   # Chameleon-30B: the same two norms, applied to each branch's output instead of its input
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, mask, kv_cache, input_pos))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        if config.num_classes:   # LlamaGen's LabelEmbedder table; its last row is the null class (class dropout)
            self.cls_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)   # untied, as Emu3
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # residual projections start small so the residual stream does not grow with depth (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> (B, T, C); with num_classes, ids from vocab_size on are class embeddings."""
        V = self.config.vocab_size
        if not self.config.num_classes:
            return self.embed_tokens(idx)
        is_class = (idx >= V)[..., None]
        return torch.where(is_class, self.cls_embedding((idx - V).clamp(min=0)), self.embed_tokens(idx.clamp(max=V - 1)))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generation), in the model's dtype
        and on its device. The caller owns it."""
        return KVCache(self.config, batch_size, max_len, self.lm_head.weight.dtype, self.lm_head.weight.device)

    def cache_nbytes(self, batch_size: int, max_len: int) -> int:
        """The bytes new_cache(batch_size, max_len) would allocate (the engine checks them against free memory)."""
        return KVCache.nbytes(self.config, batch_size, max_len, self.lm_head.weight.dtype)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, every_position: bool = False, *,
                select: torch.Tensor | None = None, checkpoint_layers: bool = False) -> torch.Tensor:
        """idx (B, T) token ids.
        Without a cache: a full causal pass; attention_mask (B, T) is 1 for tokens, 0 for left padding (optional).
        Returns logits (B, T, V). Two training options (finetune.py): `select` (B, T) bool returns the logits of
        the selected positions only, (N, V), so positions without loss never meet the 184622-wide head;
        checkpoint_layers recomputes each block in the backward pass instead of keeping its activations.
        With a cache: a decode step writing slots input_pos (T,) of `cache` (padding was declared by
        cache.start). Returns logits (B, 1, V) for the last position, or (B, T, V) with every_position."""
        if (cache is None) != (input_pos is None):
            raise ValueError("a decode step takes both cache= (model.new_cache(batch_size, max_len)) and "
                             "input_pos= (the cache slots to write); a full pass takes neither")
        B, T = idx.shape
        x = self.embed(idx)                                                        # (B, T, C)
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.config.max_seq_len}")
            if attention_mask is None:
                positions = torch.arange(T, device=idx.device).expand(B, T)
                mask = None   # plain causal: lets SDPA take its is_causal fast path
            else:
                valid = attention_mask.bool()
                positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
                causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                mask = self._mask(causal, valid, torch.arange(T, device=idx.device))
            cos, sin = rope_cos_sin(positions, self.config, x.dtype)
            for layer in self.layers:
                if checkpoint_layers:   # keeps only each block's input; its inside is recomputed in backward
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask)
            if select is not None:
                x = x[select]                                                      # (N, C)
            return self.lm_head(self.norm(x)).float()

        if attention_mask is not None:
            raise ValueError("a decode step takes no attention_mask: declare the prompt's left padding once with "
                             "cache.start(prompt_mask)")
        # positions and rotary tables were computed for every slot by cache.start(): only look them up
        cos, sin = cache.cos[:, input_pos], cache.sin[:, input_pos]                 # (B, T, head_dim)
        causal = cache.slots[None, :] <= input_pos[:, None]                         # (T, S)
        mask = self._mask(causal, cache.is_token, input_pos, cache.slots)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, (cache.k[i], cache.v[i]), input_pos)
        if not every_position:
            x = x[:, -1:]   # decoding only needs the next token's distribution
        return self.lm_head(self.norm(x)).float()

    @staticmethod
    def _mask(causal, key_valid, query_slots, slots=None):
        """(B, 1, T, S) bool: causal AND the key is a real token. Every query may also see itself, so a padding
        query never has an all-masked row (softmax of all -inf is NaN); padding outputs are never used.
        Cache slots past the newest query (stale tokens of an earlier call, rejected draft tokens) are hidden
        by `causal`, so a reused cache never needs clearing."""
        slots = torch.arange(key_valid.size(1), device=key_valid.device) if slots is None else slots
        self_slot = query_slots[:, None] == slots[None, :]                                       # (T, S)
        return ((causal[None] & key_valid[:, None, :]) | self_slot[None])[:, None]
