"""Autoregressive sampling: prefill, one-token decode steps, classifier-free guidance, grid constraints.

An image is drawn one token at a time after the prompt `BOS caption BOI "h*w" IMG`:
1. prefill: the (left-padded) prompts go through the GPT once, filling the static KV cache;
2. each step: log-probabilities of the next token -> CFG mix -> grid constraint -> temperature / top-k /
   top-p -> sample; the token is fed back as a one-token decode step.

The loop is gpt-fast's ("Accelerating Generative AI with PyTorch II: GPT, Fast", 2023): a `Decoder` owns the
model's KV cache (allocated once for a batch size and length, reused by later calls, freed by release()) and the
one-token decode step, which has the same shapes at every step and so can be handed to torch.compile (CUDA graphs
on a GPU). Nothing in the image loop waits for the device: the cache slot is a device tensor advanced in place,
the grid constraint is a lookup into a device table, sampling draws on the device, and which steps finish a row
is known from the schedule, so a GPU runs ahead of Python. With `sjd=n` the same loop verifies n drafted tokens
per forward instead (speculative Jacobi decoding, sjd.py).

Classifier-free guidance runs the conditional and the unconditional prompts as ONE doubled batch
[cond; uncond] through one forward per step (LlamaGen, min-dalle). The released Emu3 code instead runs two
sequential forwards per token (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor), which is why it
takes ~16k forwards for one 720x720 image. Both halves are fed the same sampled token, so the unconditional
branch sees the same image tokens, exactly as in Emu3. The shorter prompt is left-padded and its padding is
masked out of attention (Emu3 issue #56 reports degraded images from batched CFG with padding); positions count
only real tokens, as Emu3's do (RoPE is relative, so this matters only for rounding at large positions).
The mix is Emu3's, in log-prob space: log p = uncond + g * (cond - uncond) on log_softmax outputs. LlamaGen
mixes raw logits instead (`cfg_on="logits"`). The two differ only by a per-row constant (-(1-g)*logsumexp(uncond)
- g*logsumexp(cond)), which softmax, temperature, top-k and top-p all ignore, so they draw from the same
distribution; each family uses its own form so each processing step matches its released code. LlamaGen's
`cfg_interval` >= 0 stops guiding after the first cfg_interval + 2 tokens (the unconditional half still runs).
g = 1 skips the unconditional branch entirely, so it IS unguided sampling, token for token.

Grid constraints: `Layout.grid_schedule` says what may stand at each offset after IMG (a visual token inside a
row, EOL at each row end, EOF after each frame, then EOI and EOS); `GridConstraint` precomputes one vocabulary
mask per kind of slot and masks the logits with it before sampling, so a malformed grid is impossible whatever
the model's logits are (Emu3's prefix_allowed_tokens_fn, as a table instead of Python branching per step).

Chameleon / Anole add two options on the same loop. A 3-way CFG (`image_prompts`, `cfg_image_scale`): the batch is
[full prompt; image-only prompt; unconditional] and the mix is InstructPix2Pix's, uncond + s_img * (image - uncond)
+ s_txt * (full - image) (Chameleon's reference ImageDecoder: s_img 1.2, s_txt 3.0). And CM3Leon's contrastive
decoding with top-K (`cdk_k`, see `cdk_scores`) in place of the CFG mix, for every family. `keep` starts the image
from given first rows (image completion): they are appended to every branch's prompt and the sampler continues.
`Guidance` holds these rules once, for one token or a speculative window, so sjd.py verifies against them too.

Sampling functions are small and pure, with an explicit torch.Generator, so a seed reproduces an image on CPU;
`probabilities` is the distribution `sample` draws from, which speculative decoding needs to see whole.
"""

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .gpt import KVCache
from .layout import VISUAL, Layout


def cfg_mix(cond_logprobs: torch.Tensor, uncond_logprobs: torch.Tensor, scale: float) -> torch.Tensor:
    """Emu3's guidance: push the conditional distribution away from the unconditional one, in log-prob space."""
    return uncond_logprobs + scale * (cond_logprobs - uncond_logprobs)


def cfg_mix3(cond: torch.Tensor, image_cond: torch.Tensor, uncond: torch.Tensor, text_scale: float,
             image_scale: float) -> torch.Tensor:
    """Chameleon's 3-way guidance (InstructPix2Pix's): image_scale pulls towards the prompt's images, text_scale
    towards its text on top of them. With no image in the prompt image_cond is uncond: 2-way CFG at text_scale."""
    return uncond + image_scale * (image_cond - uncond) + text_scale * (cond - image_cond)


def cdk_scores(cond_logprobs: torch.Tensor, uncond_logprobs: torch.Tensor, k: int, alpha: float = 0.1) -> torch.Tensor:
    """CM3Leon's contrastive decoding with top-K (CD-K; Yu et al. 2023, arXiv 2309.02591, section 3.1), the rule
    implemented here, on (..., V) log-probabilities:

        candidates = {t : p_cond(t) >= alpha * (k-th largest p_cond)}
        score(t)   = log p_cond(t) - log p_uncond(t)   for t in candidates, -inf otherwise

    It is Li et al.'s contrastive decoding (arXiv 2210.15097: expert = the conditional model, amateur = CFG's
    unconditional branch; plausibility set p >= alpha * max p, alpha 0.1) with the max replaced by the k-th
    largest, so at least k tokens stay candidates. The scores are then sampled like logits (temperature, top-k,
    top-p). This is our reading of the paper's description, not released code (there is none); alpha 0.1 is Li et
    al.'s value, k is the caller's."""
    kth = cond_logprobs.topk(min(k, cond_logprobs.size(-1)), dim=-1).values[..., -1:]   # (..., 1)
    # p >= alpha * p_k, in logs; a masked token (-inf) is never a candidate, even when fewer than k are allowed
    candidate = (cond_logprobs >= kth + math.log(alpha)) & (cond_logprobs > float("-inf"))
    return (cond_logprobs - uncond_logprobs).masked_fill(~candidate, float("-inf"))


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the distribution `sample` draws from (..., V). Filters in transformers' order:
    temperature, then top-k, then top-p (nucleus); masked entries (-inf) get probability 0. temperature 0 is
    greedy: all the mass on the argmax."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]                 # (..., 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already hold top_p of the mass (the best one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from non-negative weights (..., V), normalised or not -> ids (...), by inverting the
    cumulative sum at a uniform point: one random number per row (speculative decoding draws whole windows of
    rows), and unlike torch.multinomial it never makes the GPU wait for the CPU (gpt-fast's no-sync sampling).
    A token of weight 0 is never drawn: the cumulative sum does not rise at it."""
    cdf = weights.cumsum(-1)                                                    # (..., V)
    point = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, point, right=True)[..., 0].clamp(max=weights.size(-1) - 1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy (argmax, no random draw)."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(probabilities(logits, temperature, top_k, top_p), generator)


class GridConstraint:
    """The precomputed constraint table: `allowed[kind]` is a vocabulary mask and `kind_at[step]` says which
    mask applies at each offset after IMG. Applying it is one masked_fill per step."""

    def __init__(self, layout: Layout, h: int, w: int, frames: int = 1, vocab_size: int | None = None,
                 device=None):
        self.schedule = layout.grid_schedule(h, w, frames)
        kinds = sorted(set(self.schedule))                  # VISUAL and the few structural token ids
        self.allowed = torch.zeros(len(kinds), vocab_size or layout.vocab_size, dtype=torch.bool)
        for row, kind in enumerate(kinds):
            if kind == VISUAL:
                self.allowed[row, layout.first_visual:layout.first_visual + layout.codebook_size] = True
            else:
                self.allowed[row, kind] = True
        self.allowed = self.allowed.to(device)
        self.kind_at = [kinds.index(kind) for kind in self.schedule]
        # the same on the device, for looking up the masks of a whole window at once (speculative decoding)
        self.kind_at_device = torch.tensor(self.kind_at, device=device)

    def __len__(self):
        return len(self.schedule)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        return logits.masked_fill(~self.allowed[self.kind_at[step]], float("-inf"))

    def window(self, logits: torch.Tensor, first_step: int) -> torch.Tensor:
        """logits (B, T, V) for the T offsets from first_step on -> the same, constrained."""
        kinds = self.kind_at_device[first_step:first_step + logits.size(1)]
        return logits.masked_fill(~self.allowed[kinds], float("-inf"))


@dataclass(frozen=True)
class Guidance:
    """How the branches' next-token logits become one score table per image: the CFG mix (Emu3's on log-probs or
    LlamaGen's on logits, with cfg_interval), Chameleon's 3-way mix, or CD-K; then the grid constraint. The batch
    holds `batch` rows per branch, [cond; image-only (3-way only); uncond (guided only)]. One rule for a decode
    step (T = 1) and for a speculative window (T tokens), so SJD verifies against exactly what plain decoding
    samples from."""

    batch: int
    guided: bool = False                 # an unconditional branch follows (CFG, 3-way CFG or CD-K)
    cfg_scale: float = 1.0               # 3-way: the text scale
    cfg_on: str = "logprobs"             # or "logits" (LlamaGen)
    cfg_interval: int = -1               # >= 0: guide only steps 0 .. cfg_interval + 1 (LlamaGen)
    image_scale: float | None = None     # 3-way CFG: an image-only branch sits in the middle
    cdk_k: int | None = None             # CD-K against the unconditional branch instead of a CFG mix
    cdk_alpha: float = 0.1

    @property
    def branches(self) -> int:
        return 1 + (self.image_scale is not None) + self.guided

    def __call__(self, logits: torch.Tensor, first_step: int, constraint: GridConstraint | None) -> torch.Tensor:
        """logits (branches * B, T, V) of the tokens at offsets first_step .. first_step+T-1 after IMG -> the
        scores (B, T, V) that temperature / top-k / top-p and the draw work on."""
        fit = (lambda x: x) if constraint is None else (lambda x: constraint.window(x, first_step))
        if self.cdk_k is not None:   # CD-K on log-probabilities over what the constraint allows
            cond, uncond = fit(logits[:self.batch]), fit(logits[-self.batch:])
            return fit(cdk_scores(F.log_softmax(cond, -1), F.log_softmax(uncond, -1), self.cdk_k, self.cdk_alpha))
        scores = logits if self.cfg_on == "logits" else F.log_softmax(logits, dim=-1)
        if self.image_scale is not None:
            scores = cfg_mix3(*scores.split(self.batch), text_scale=self.cfg_scale, image_scale=self.image_scale)
        elif self.guided:
            cond, uncond = scores.split(self.batch)
            scores = self._interval(cfg_mix(cond, uncond, self.cfg_scale), cond, first_step)
        return fit(scores)

    def _interval(self, mixed, cond, first_step):
        """LlamaGen counts cfg_interval in decode steps after the prefill's token: step s is decode step s - 1, so
        steps up to cfg_interval + 1 are guided and later ones take the conditional scores."""
        last = self.cfg_interval + 1
        steps = range(first_step, first_step + mixed.size(1))
        if self.cfg_interval < 0 or steps[-1] <= last:
            return mixed
        if steps[0] > last:
            return cond
        guided = torch.arange(steps[0], steps[-1] + 1, device=mixed.device) <= last   # (T,): a window across it
        return torch.where(guided[:, None], mixed, cond)


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Left-pad token lists to one (B, L) batch; the mask is 1 on tokens, 0 on padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def decode_step(model, cache: KVCache, tokens: torch.Tensor, input_pos: torch.Tensor,
                every_position: bool = False) -> torch.Tensor:
    """One decode forward: tokens (B, T) at cache slots input_pos (T,) -> next-token logits (B, V), or (B, T, V)
    for every position of a speculative window. Fixed shapes for a given cache and T: the function that
    --compile hands to torch.compile."""
    logits = model(tokens, cache=cache, input_pos=input_pos, every_position=every_position)
    return logits if every_position else logits[:, -1]


class Decoder:
    """The generator's state, with one owner (gpt-fast's generate + setup_caches): a model, its KV cache and the
    (optionally compiled) decode step.

    The cache is allocated on the first prefill for (rows, prompt + new tokens, rounded up to cache_block) and
    kept: a later call with the same number of rows and no more tokens reuses it (the slots it does not need are
    masked out), a bigger one replaces it. release() frees it. Keep one Decoder per model to draw many images without reallocating
    (Pipeline does); a Decoder made for one call lives as long as that call.

    compile=True hands decode_step to torch.compile: mode "reduce-overhead" (CUDA graphs) on CUDA, inductor's
    default elsewhere. It changes speed only: the same tokens (tests/test_speed.py)."""

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
        ids, mask = left_pad(prompts, pad_id, self.device)
        length = ids.size(1)
        if length + n_new > self.model.config.max_seq_len:
            raise ValueError(f"prompt of {length} tokens + {n_new} new tokens exceeds the model's context of "
                             f"{self.model.config.max_seq_len} tokens; shorten the prompt or generate less")
        needed = length + n_new
        if self.cache is None or self.cache.batch_size != len(prompts) or self.cache.max_len < needed:
            self.cache = None   # free the old one before allocating its successor
            # rounded up, so prompts of slightly different lengths share one cache and one compiled step
            size = min(-(-needed // self.cache_block) * self.cache_block, self.model.config.max_seq_len)
            self.cache = self.model.new_cache(len(prompts), size)
            if self.compile:
                self.cache.mark_static()
        self.cache.start(mask)
        self.forwards += 1
        logits = self.model(ids, cache=self.cache, input_pos=torch.arange(length, device=self.device))
        return logits[:, -1], length

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """decode_step on this decoder's cache (see there)."""
        if self.compile and self.device.type == "cuda":
            # CUDA graphs reuse their output buffers: this says the previous step's logits were consumed
            torch.compiler.cudagraph_mark_step_begin()
        self.forwards += 1
        return self._step(self.model, self.cache, tokens, input_pos, every_position)


class Rows(NamedTuple):
    tokens: torch.Tensor        # (B, n) tokens generated after IMG so far
    codes: torch.Tensor | None  # (B, rows_done, w) codes of the finished rows (frames stacked); None unconstrained
    rows_done: int
    rows_total: int


@torch.inference_mode()
def generate_image_stream(model, layout: Layout, prompts: list[list[int]], h: int, w: int, frames: int = 1,
                          negative_prompts: list[list[int]] | None = None, cfg_scale: float = 3.0,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          generator: torch.Generator | None = None, constrain: bool = True,
                          cfg_on: str = "logprobs", cfg_interval: int = -1,
                          image_prompts: list[list[int]] | None = None, cfg_image_scale: float = 1.0,
                          cdk_k: int | None = None, cdk_alpha: float = 0.1, keep: torch.Tensor | None = None,
                          decoder: Decoder | None = None, sjd: int = 0) -> Iterator[Rows]:
    """Draw len(prompts) images (or videos, frames > 1) of h x w codes; yields Rows after every finished row,
    the last one carrying every token through EOS. Prompts end with IMG (Layout.generation_prompt).
    negative_prompts: the unconditional branch for CFG, one per prompt (Emu3: a negative prompt; toy models:
    the empty caption). cfg_on: "logprobs" (Emu3) or "logits" (LlamaGen) is what CFG mixes; cfg_interval: see
    the module docstring. image_prompts: Chameleon's image-only branch (3-way CFG, cfg_image_scale; cfg_scale is
    then the text scale). cdk_k: CD-K (cdk_scores) against the negative prompts instead of the CFG mix.
    keep: (B, r, w) codes of the first r rows, kept as given (image completion; images only).
    decoder: a Decoder of `model` to reuse (its cache, its compiled step); None makes one for this call.
    sjd: 0 decodes one token per forward; n >= 2 uses speculative Jacobi decoding with a window of n tokens
    (sjd.py), which draws from the same distribution in fewer forwards."""
    batch = len(prompts)
    guided = cfg_scale != 1.0 or image_prompts is not None or cdk_k is not None
    if cfg_on not in ("logprobs", "logits"):
        raise ValueError(f"cfg_on must be 'logprobs' (Emu3) or 'logits' (LlamaGen), got {cfg_on!r}")
    if guided and (negative_prompts is None or len(negative_prompts) != batch):
        raise ValueError(f"cfg_scale {cfg_scale} needs one negative (unconditional) prompt per prompt; "
                         f"pass negative_prompts, or cfg_scale=1 for unguided sampling")
    if image_prompts is not None and len(image_prompts) != batch:
        raise ValueError(f"3-way CFG needs one image-only prompt per prompt, got {len(image_prompts)} for {batch}")
    guidance = Guidance(batch, guided, cfg_scale, cfg_on, cfg_interval,
                        cfg_image_scale if image_prompts is not None else None, cdk_k, cdk_alpha)
    branches = [prompts] + ([image_prompts] if image_prompts is not None else []) + ([negative_prompts] if guided else [])
    decoder = decoder or Decoder(model)
    constraint = GridConstraint(layout, h, w, frames, model.config.vocab_size, decoder.device)
    row_ends = layout.row_ends(h, w, frames)
    kept = torch.empty(batch, 0, dtype=torch.long)
    if keep is not None:   # image completion: the kept rows, as the schedule writes them, extend every prompt
        if frames != 1 or keep.dim() != 3 or keep.shape[0] != batch or keep.shape[2] != w or keep.shape[1] >= h:
            raise ValueError(f"keep must be (batch {batch}, r < {h} rows, {w}) codes of an image, got {tuple(keep.shape)}")
        start = row_ends[keep.shape[1] - 1] + 1 if keep.shape[1] else 0
        codes = iter(keep.flatten(1).T.tolist())   # one row of B codes per visual slot, in raster order
        columns = [[c + layout.first_visual for c in next(codes)] if kind == VISUAL else [kind] * batch
                   for kind in constraint.schedule[:start]]
        kept = torch.tensor(columns, dtype=torch.long).view(start, batch).T                  # (B, start)
        branches = [[p + kept[i].tolist() for i, p in enumerate(branch)] for branch in branches]
    visual_steps = torch.tensor([s for s, kind in enumerate(constraint.schedule) if kind == VISUAL],
                                device=decoder.device)
    report = lambda tokens, rows_done: _rows(tokens, layout, visual_steps, w, rows_done, len(row_ends), constrain)
    loop_args = dict(decoder=decoder, layout=layout, constraint=constraint, row_ends=row_ends, guidance=guidance,
                     prompts=[p for branch in branches for p in branch], kept=kept.to(decoder.device),
                     constrain=constrain, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if sjd:
        from .sjd import jacobi_decode   # sjd.py builds on this module, so it is imported when asked for
        loop = jacobi_decode(window=sjd, **loop_args)
    else:
        loop = _decode(**loop_args)
    for tokens, rows_done in loop:
        yield report(tokens, rows_done)


def _decode(decoder, layout, constraint, row_ends, guidance, prompts, kept, constrain, temperature, top_k, top_p,
            generator) -> Iterator[tuple[torch.Tensor, int]]:
    """The plain loop: one forward per token, yields (tokens so far, rows done) at every row end. prompts: every
    branch's prompts, stacked as Guidance expects; kept (B, start): the first tokens, given (image completion).
    Nothing in it waits for the device: the cache slot advances in place, the constraint is a lookup into a
    device table, and which steps end a row is known from the schedule, so a GPU runs ahead of Python."""
    n_new, start = len(constraint), kept.size(1)
    logits, length = decoder.prefill(prompts, layout.pad, n_new - start)
    out = torch.full((guidance.batch, n_new), layout.pad, dtype=torch.long, device=logits.device)
    out[:, :start] = kept
    input_pos = torch.tensor([length], device=logits.device)   # the cache slot of the token fed next
    rows_done = sum(end < start for end in row_ends)
    row_ends = set(row_ends)
    for step in range(start, n_new):
        scores = guidance(logits[:, None], step, constraint if constrain else None)[:, 0]   # (B, V)
        token = sample(scores, generator, temperature, top_k, top_p)           # (B,)
        out[:, step] = token
        if step + 1 < n_new:   # nothing comes after the last token, so it needs no forward
            fed = token.repeat(guidance.branches)[:, None]                     # (rows, 1): every branch sees it
            logits = decoder.step(fed, input_pos)
            input_pos += 1
        if step in row_ends:
            rows_done += 1
            if rows_done < len(row_ends):   # the last row is reported with the final tokens below
                yield out[:, :step + 1], rows_done
    yield out, rows_done


def _rows(tokens, layout, visual_steps, w, rows_done, rows_total, constrain) -> Rows:
    codes = None
    if constrain:   # the structure is guaranteed, so the codes sit at the schedule's visual offsets
        done = visual_steps[:rows_done * w]
        codes = (tokens[:, done] - layout.first_visual).view(tokens.size(0), rows_done, w)
    return Rows(tokens, codes, rows_done, rows_total)


def generate_image(model, layout: Layout, prompts: list[list[int]], h: int, w: int, frames: int = 1,
                   repair: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Like generate_image_stream, but returns (tokens (B, n), codes (B, h, w) or (B, frames, h, w)).
    The codes are read back through Layout.read_grid, which raises on a malformed grid (possible only with
    constrain=False) unless repair=True."""
    for rows in generate_image_stream(model, layout, prompts, h, w, frames, **kwargs):
        pass
    codes = [layout.read_grid(row.tolist(), h, w, frames if frames > 1 else None, repair=repair)[0]
             for row in rows.tokens.cpu()]
    return rows.tokens, torch.stack(codes)


@torch.inference_mode()
def generate_text(model, layout: Layout, prompts: list[list[int]], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, allowed: torch.Tensor | None = None,
                  decoder: Decoder | None = None) -> list[list[int]]:
    """Continue each prompt until EOS (not included in the result) or max_new_tokens; greedy by default, as
    Emu3-Chat. allowed: optional (V,) bool mask of tokens that may be generated (e.g. no visual tokens).
    Unlike an image, text has no schedule: whether every row has stopped is asked of the device each step."""
    decoder = decoder or Decoder(model)
    logits, length = decoder.prefill(prompts, layout.pad, max_new_tokens)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    input_pos = torch.tensor([length], device=logits.device)
    out = []
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(logits.float(), dim=-1)
        if allowed is not None:
            logprobs = logprobs.masked_fill(~allowed, float("-inf"))
        token = sample(logprobs, generator, temperature, top_k, top_p)
        token = token.masked_fill(finished, layout.pad)   # rows that hit EOS keep feeding padding
        out.append(token)
        finished |= token == layout.eos
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        logits = decoder.step(token[:, None], input_pos)
        input_pos += 1
    rows = torch.stack(out, dim=1).tolist()
    return [row[:row.index(layout.eos)] if layout.eos in row else row for row in rows]
