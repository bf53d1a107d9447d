"""The memory plan of a fine-tune: what each rank holds, counted before the first step, and refused if it won't fit.

An 8B model is ~17 GB of bf16 weights; the same model trained in full with AdamW needs 4 + 4 + 8 bytes more per
parameter (fp32 master weights, their gradients, Adam's two moments): ~136 GB, which is why full fine-tuning of
Emu3 needs FSDP across GPUs and LoRA fits one card. The plan adds, per rank:

- weights: every parameter at the dtype it is stored in (bf16 base, fp32 adapters, or fp32 masters), divided by
  the ranks for FSDP, plus (FSDP) the unsharded copies of what runs at once: the root's embedding and head and two
  blocks (the one running, the one prefetched) in the compute dtype;
- gradients and optimizer state: for the parameters that train only (fp32: adapters or masters), a gradient and
  AdamW's two moments in the parameter's dtype, divided by the ranks for FSDP;
- activations: what the backward pass keeps of a batch of `batch` sequences of `seq_len` tokens. Per token and
  block a Llama block keeps about 10 x dim + 2 x kv_dim + 4 x SwiGLU width numbers (the normed inputs, q, k, v,
  the attention output, the SwiGLU gate, up, product and inputs; SDPA keeps no T x T matrix); with activation
  checkpointing only each block's input is kept, plus one block's worth while it is recomputed;
- logits: the head's output at the positions that carry loss (GPT.forward's `select`), in the compute dtype, its
  fp32 copy and the fp32 gradient of the cross-entropy: 2 + 4 + 4 bytes per position and vocabulary entry. For
  Emu3-Gen at 720x720 (8,193 tokens of image per sample, 184,622 entries) that is 15 GB per sample: often the
  largest line.
The activation and logits lines are estimates of the tensors the backward pass keeps (the allocator's slack and
temporary buffers come on top: the check leaves 10% free); the others are exact counts.
"""

from dataclasses import dataclass

import torch

HEADROOM = 0.9   # plan at most this share of the device's free memory


def nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class Plan:
    weights: int
    gathered: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    ranks: int
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.grads + self.optimizer + self.activations + self.logits

    def table(self) -> str:
        rows = [("weights (stored)", self.weights), ("weights gathered for compute (FSDP)", self.gathered),
                ("gradients", self.grads), ("optimizer state (AdamW, fp32)", self.optimizer),
                ("activations kept for backward", self.activations), ("logits at loss positions", self.logits)]
        lines = [f"memory plan per rank ({self.ranks} rank{'s' if self.ranks > 1 else ''}{self.note}):"]
        lines += [f"  {name:38s} {size(n):>10s}" for name, n in rows if n]
        return "\n".join(lines + [f"  {'total':38s} {size(self.total):>10s}"])


def block_activations(config, tokens: int, dtype: torch.dtype) -> int:
    """What one decoder block keeps for backward, for `tokens` tokens (see the module docstring)."""
    kv_dim = config.n_kv_head * config.head_dim
    per_token = 10 * config.dim + 2 * kv_dim + 4 * config.intermediate_size
    return tokens * per_token * nbytes(dtype) + tokens * 2 * 4   # + two fp32 RMSNorm statistics per token


def plan(model, batch: int, seq_len: int, loss_positions: int, compute_dtype: torch.dtype, ranks: int = 1,
         fsdp: bool = False, checkpointing: bool = False) -> Plan:
    """The plan for `model` (a GPT, possibly with LoRA modules; built on the meta device for a released size) as
    it will train: its parameters' dtypes and requires_grad say what is stored and what trains. batch: sequences
    per rank; loss_positions: positions per rank whose logits meet the loss."""
    config = model.config
    params = list(model.parameters())
    stored = sum(p.numel() * p.element_size() for p in params)
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)   # grads and moments alike
    shard = ranks if fsdp else 1
    gathered = 0
    if fsdp:   # the root (embeddings, final norm, head) and two blocks unsharded at once, in the compute dtype
        block = sum(p.numel() for p in model.layers[0].parameters())
        root = sum(p.numel() for p in params) - block * len(model.layers)
        gathered = (root + 2 * block) * nbytes(compute_dtype)
    tokens = batch * seq_len
    if checkpointing:
        kept = len(model.layers) * tokens * config.dim * nbytes(compute_dtype) + block_activations(
            config, tokens, compute_dtype)
    else:
        kept = len(model.layers) * block_activations(config, tokens, compute_dtype)
    kept += tokens * config.dim * (nbytes(compute_dtype) + 4)    # the embedding output, the final norm's input
    logits = loss_positions * config.vocab_size * (nbytes(compute_dtype) + 4 + 4)
    return Plan(stored // shard, gathered, trained // shard, 2 * trained // shard, kept, logits, ranks,
                note=", FSDP" if fsdp else "")


def check_fits(memory_plan: Plan, free: int | None, device: torch.device) -> str:
    """Raise MemoryError (one line: the figure, the device's, what to change) when the plan needs more than
    HEADROOM of `free` bytes; else return a line saying how it fits (or that the device's memory is unknown)."""
    where = "RAM" if device.type == "cpu" else f"{device} memory"
    if free is None:
        return f"(the free {where} is unknown here: the plan is not checked)"
    if memory_plan.total > HEADROOM * free:
        raise MemoryError(f"the memory plan needs {size(memory_plan.total)} per rank, and {size(free)} of {where} "
                          f"is free (90% of it may be planned): train LoRA instead of --full, lower --batch, add "
                          f"--checkpointing, or shard with --fsdp across more GPUs")
    return f"fits: {size(memory_plan.total)} of the {size(free)} {where} free"
