"""The engine: a model, its static KV cache and its one-token decode step, with one owner.

gpt-fast's generate + setup_caches ("Accelerating Generative AI with PyTorch II: GPT, Fast", 2023); nanochat
calls its own an Engine too. The sampler (sampler.py, sjd.py) decides WHAT to draw; the engine runs the forwards:
`prefill` runs the left-padded prompts into the cache once, `step` feeds one token (or a speculative window) at
given cache slots. The cache is allocated once for a batch size and length, reused by later calls and freed by
release(); the decode step has the same shapes at every step, so it can be handed to torch.compile (CUDA graphs
on a GPU). The GPT itself holds no decoding state (gpt.py).
"""

from pathlib import Path

import torch

from .gpt import KVCache


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Left-pad token lists to one (B, L) batch; the mask is 1 on tokens, 0 on padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate, as far as the system says: on CUDA the driver's free memory plus what
    PyTorch's caching allocator holds unused; on the CPU Linux's MemAvailable. None where it cannot tell."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def decode_step(model, cache: KVCache, tokens: torch.Tensor, input_pos: torch.Tensor,
                every_position: bool = False) -> torch.Tensor:
    """One decode forward: tokens (B, T) at cache slots input_pos (T,) -> next-token logits (B, V), or (B, T, V)
    for every position of a speculative window. Fixed shapes for a given cache and T: the function that
    --compile hands to torch.compile."""
    logits = model(tokens, cache=cache, input_pos=input_pos, every_position=every_position)
    return logits if every_position else logits[:, -1]


class Engine:
    """A model, its KV cache and the (optionally compiled) decode step.

    The cache is allocated on the first prefill for (rows, prompt + new tokens, rounded up to cache_block) and
    kept: a later call with the same number of rows and no more tokens reuses it (the slots it does not need are
    masked out), a bigger one replaces it; one bigger than the device's free memory is refused, with both figures,
    before it is allocated. release() frees it. Keep one Engine per model to draw many images
    without reallocating (Pipeline does); an Engine made for one call lives as long as that call.

    compile=True hands decode_step to torch.compile: mode "reduce-overhead" (CUDA graphs) on CUDA, inductor's
    default elsewhere. It changes speed only: the same tokens (tests/test_engine.py)."""

    cache_block = 128   # cache lengths are multiples of this (up to the model's context)

    def __init__(self, model, compile: bool = False):
        self.model, self.compile = model, compile
        self.cache = None
        self.forwards = 0   # model calls since creation, prefill included (the benchmark's "forwards per image")
        self.device = model.lm_head.weight.device
        self._step = decode_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    def release(self) -> None:
        """Drop the KV cache (its memory returns to the allocator; the next prefill allocates a new one)."""
        self.cache = None

    # inference mode: the cache is made and written only here, so it never meets autograd (and is cheaper)
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], pad_id: int, n_new: int) -> tuple[torch.Tensor, int]:
        """Run the (left-padded) prompts into the cache, with room for n_new more tokens; returns (next-token
        logits (B, V), the prompt length L, i.e. the cache slot of the first new token)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        length = max(len(p) for p in prompts)
        if length + n_new > self.model.config.max_seq_len:
            raise ValueError(f"prompt of {length} tokens + {n_new} new tokens exceeds the model's context of "
                             f"{self.model.config.max_seq_len} tokens; shorten the prompt or generate less")
        needed = length + n_new
        if self.cache is None or self.cache.batch_size != len(prompts) or self.cache.max_len < needed:
            self.cache = None   # free the old one before allocating its successor
            # rounded up, so prompts of slightly different lengths share one cache and one compiled step
            size = min(-(-needed // self.cache_block) * self.cache_block, self.model.config.max_seq_len)
            self._check_memory(len(prompts), size)
            self.cache = self.model.new_cache(len(prompts), size)
            if self.compile:
                self.cache.mark_static()
        ids, mask = left_pad(prompts, pad_id, self.device)
        self.cache.start(mask)
        self.forwards += 1
        logits = self.model(ids, cache=self.cache, input_pos=torch.arange(length, device=self.device))
        return logits[:, -1], length

    def _check_memory(self, rows: int, size: int) -> None:
        """Refuse a cache the device cannot hold, with the figures, before allocating it (sample.py --n 100000
        would otherwise ask for tens of GB and be killed by the OS, or fail deep inside torch)."""
        needed = self.model.cache_nbytes(rows, size)
        free = free_memory(self.device)
        if free is not None and needed > free:
            raise ValueError(f"a KV cache for {rows} rows of {size} tokens (the images drawn at once, times 2 with "
                             f"CFG) needs {_size(needed)}, more than the {_size(free)} free on {self.device}: draw "
                             f"fewer at once (a smaller --n, or Pipeline.draw's batch_size)")

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """decode_step on this engine's cache (see there)."""
        if self.compile and self.device.type == "cuda":
            # CUDA graphs reuse their output buffers: this says the previous step's logits were consumed
            torch.compiler.cudagraph_mark_step_begin()
        self.forwards += 1
        return self._step(self.model, self.cache, tokens, input_pos, every_position)
