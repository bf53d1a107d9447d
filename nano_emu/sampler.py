"""Autoregressive sampling: prefill, one-token decode steps, classifier-free guidance, grid constraints.

An image is drawn one token at a time after the prompt `BOS caption BOI "h*w" IMG`:
1. prefill: the (left-padded) prompts go through the GPT once, filling the static KV cache;
2. each step: log-probabilities of the next token -> CFG mix -> grid constraint -> temperature / top-k /
   top-p -> sample; the token is fed back as a one-token decode step.

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

Sampling functions are small and pure, with an explicit torch.Generator, so a seed reproduces an image on CPU.
"""

import math
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

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
    implemented here, on (B, V) log-probabilities:

        candidates = {t : p_cond(t) >= alpha * (k-th largest p_cond)}
        score(t)   = log p_cond(t) - log p_uncond(t)   for t in candidates, -inf otherwise

    It is Li et al.'s contrastive decoding (arXiv 2210.15097: expert = the conditional model, amateur = CFG's
    unconditional branch; plausibility set p >= alpha * max p, alpha 0.1) with the max replaced by the k-th
    largest, so at least k tokens stay candidates. The scores are then sampled like logits (temperature, top-k,
    top-p). This is our reading of the paper's description, not released code (there is none); alpha 0.1 is Li et
    al.'s value, k is the caller's."""
    kth = cond_logprobs.topk(min(k, cond_logprobs.size(-1)), dim=-1).values[:, -1:]     # (B, 1)
    # p >= alpha * p_k, in logs; a masked token (-inf) is never a candidate, even when fewer than k are allowed
    candidate = (cond_logprobs >= kth + math.log(alpha)) & (cond_logprobs > float("-inf"))
    return (cond_logprobs - uncond_logprobs).masked_fill(~candidate, float("-inf"))


def sample(logits: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy (argmax). Filters in transformers' order:
    temperature, then top-k, then top-p (nucleus); masked entries (-inf) are never drawn."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]                   # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already hold top_p of the mass (the best one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    # argmax(p / Exp(1)) is a draw from p (the "exponential race"); unlike torch.multinomial it never makes
    # the GPU wait for the CPU (gpt-fast's multinomial_sample_one_no_sync)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)


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

    def __len__(self):
        return len(self.schedule)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        return logits.masked_fill(~self.allowed[self.kind_at[step]], float("-inf"))


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Left-pad token lists to one (B, L) batch; the mask is 1 on tokens, 0 on padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def prefill(model, prompts: list[list[int]], pad_id: int, n_new: int) -> tuple[torch.Tensor, int]:
    """Allocate the cache for prompt + n_new tokens and run the prompts; returns (next-token logits (B, V),
    the prompt length L, i.e. the cache slot of the first new token)."""
    device = model.lm_head.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    length = ids.size(1)
    if length + n_new > model.config.max_seq_len:
        raise ValueError(f"prompt of {length} tokens + {n_new} new tokens exceeds the model's context of "
                         f"{model.config.max_seq_len} tokens; shorten the prompt or generate less")
    model.setup_cache(len(prompts), length + n_new)
    logits = model(ids, input_pos=torch.arange(length, device=device), attention_mask=mask)
    return logits[:, -1], length


def decode_one(model, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One decode step: tokens (B,) at cache slot input_pos (1,) -> next-token logits (B, V). This is the
    fixed-shape function worth torch.compile-ing on a GPU."""
    return model(tokens[:, None], input_pos=input_pos)[:, -1]


class Rows(NamedTuple):
    tokens: torch.Tensor        # (B, n) tokens generated after IMG so far
    codes: torch.Tensor | None  # (B, rows_done, w) codes of the finished rows (frames stacked); None unconstrained
    rows_done: int
    rows_total: int


@torch.no_grad()
def generate_image_stream(model, layout: Layout, prompts: list[list[int]], h: int, w: int, frames: int = 1,
                          negative_prompts: list[list[int]] | None = None, cfg_scale: float = 3.0,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          generator: torch.Generator | None = None, constrain: bool = True,
                          cfg_on: str = "logprobs", cfg_interval: int = -1,
                          image_prompts: list[list[int]] | None = None, cfg_image_scale: float = 1.0,
                          cdk_k: int | None = None, cdk_alpha: float = 0.1,
                          keep: torch.Tensor | None = None) -> Iterator[Rows]:
    """Draw len(prompts) images (or videos, frames > 1) of h x w codes; yields Rows after every finished row,
    the last one carrying every token through EOS. Prompts end with IMG (Layout.generation_prompt).
    negative_prompts: the unconditional branch for CFG, one per prompt (Emu3: a negative prompt; toy models:
    the empty caption). cfg_on: "logprobs" (Emu3) or "logits" (LlamaGen) is what CFG mixes; cfg_interval: see
    the module docstring. image_prompts: Chameleon's image-only branch (3-way CFG, cfg_image_scale; cfg_scale is
    then the text scale). cdk_k: CD-K (cdk_scores) against the negative prompts instead of the CFG mix.
    keep: (B, r, w) codes of the first r rows, kept as given (image completion; images only)."""
    batch = len(prompts)
    guided = cfg_scale != 1.0 or image_prompts is not None or cdk_k is not None
    if cfg_on not in ("logprobs", "logits"):
        raise ValueError(f"cfg_on must be 'logprobs' (Emu3) or 'logits' (LlamaGen), got {cfg_on!r}")
    if guided and (negative_prompts is None or len(negative_prompts) != batch):
        raise ValueError(f"cfg_scale {cfg_scale} needs one negative (unconditional) prompt per prompt; "
                         f"pass negative_prompts, or cfg_scale=1 for unguided sampling")
    if image_prompts is not None and len(image_prompts) != batch:
        raise ValueError(f"3-way CFG needs one image-only prompt per prompt, got {len(image_prompts)} for {batch}")
    branches = [prompts] + ([image_prompts] if image_prompts is not None else []) + ([negative_prompts] if guided else [])
    constraint = GridConstraint(layout, h, w, frames, model.config.vocab_size, model.lm_head.weight.device)
    n_new = len(constraint)
    rows_total, rows_done, row_ends = frames * h, 0, set(layout.row_ends(h, w, frames))
    start, kept = 0, []
    if keep is not None:   # image completion: the kept rows, as the schedule writes them, extend every prompt
        if frames != 1 or keep.dim() != 3 or keep.shape[0] != batch or keep.shape[2] != w or keep.shape[1] >= h:
            raise ValueError(f"keep must be (batch {batch}, r < {h} rows, {w}) codes of an image, got {tuple(keep.shape)}")
        rows_done = keep.shape[1]
        start = sorted(row_ends)[rows_done - 1] + 1 if rows_done else 0
        codes = iter(keep.flatten(1).T.tolist())   # one row of B codes per visual slot, in raster order
        kept = [[c + layout.first_visual for c in next(codes)] if kind == VISUAL else [kind] * batch
                for kind in constraint.schedule[:start]]
        kept = [list(row) for row in zip(*kept)] if kept else [[] for _ in range(batch)]   # (B, start)
        branches = [[p + kept[i] for i, p in enumerate(branch)] for branch in branches]
    logits, length = prefill(model, [p for branch in branches for p in branch], layout.pad, n_new - start)
    visual_steps = torch.tensor([s for s, kind in enumerate(constraint.schedule) if kind == VISUAL])
    out = torch.full((batch, n_new), layout.pad, dtype=torch.long, device=logits.device)
    if start:
        out[:, :start] = torch.tensor(kept, device=logits.device)
    for step in range(start, n_new):
        logprobs = logits.float() if cfg_on == "logits" else F.log_softmax(logits.float(), dim=-1)
        if cdk_k is not None:   # CD-K on log-probabilities over what the constraint allows
            cond, uncond = logits.float()[:batch], logits.float()[-batch:]
            if constrain:
                cond, uncond = constraint(cond, step), constraint(uncond, step)
            logprobs = cdk_scores(F.log_softmax(cond, -1), F.log_softmax(uncond, -1), cdk_k, cdk_alpha)
        elif image_prompts is not None:
            logprobs = cfg_mix3(*logprobs.split(batch), text_scale=cfg_scale, image_scale=cfg_image_scale)
        elif guided:
            cond, uncond = logprobs.split(batch)
            # LlamaGen counts cfg_interval in decode steps after the prefill's token: step s is decode step s - 1
            logprobs = cfg_mix(cond, uncond, cfg_scale) if cfg_interval < 0 or step - 1 <= cfg_interval else cond
        if constrain:
            logprobs = constraint(logprobs, step)
        token = sample(logprobs, generator, temperature, top_k, top_p)         # (B,)
        out[:, step] = token
        if step + 1 < n_new:   # nothing comes after the last token, so it needs no forward
            fed = token.repeat(len(branches))                                  # every CFG branch sees it
            logits = decode_one(model, fed, torch.tensor([length + step - start], device=logits.device))
        if step in row_ends:
            rows_done += 1
            if rows_done < rows_total:   # the last row is reported with the final tokens below
                yield _rows(out[:, :step + 1], layout, visual_steps, w, rows_done, rows_total, constrain)
    yield _rows(out, layout, visual_steps, w, rows_total, rows_total, constrain)


def _rows(tokens, layout, visual_steps, w, rows_done, rows_total, constrain) -> Rows:
    codes = None
    if constrain:   # the structure is guaranteed, so the codes sit at the schedule's visual offsets
        done = visual_steps[:rows_done * w].to(tokens.device)
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


@torch.no_grad()
def generate_text(model, layout: Layout, prompts: list[list[int]], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> list[list[int]]:
    """Continue each prompt until EOS (not included in the result) or max_new_tokens; greedy by default, as
    Emu3-Chat. allowed: optional (V,) bool mask of tokens that may be generated (e.g. no visual tokens)."""
    logits, length = prefill(model, prompts, layout.pad, max_new_tokens)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
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
        logits = decode_one(model, token, torch.tensor([length + step], device=logits.device))
    rows = torch.stack(out, dim=1).tolist()
    return [row[:row.index(layout.eos)] if layout.eos in row else row for row in rows]
