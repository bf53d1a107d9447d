"""Speculative Jacobi decoding (SJD): several image tokens per forward, drawn from the same distribution.

Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding" (arXiv 2410.01699). Plain decoding spends one forward per token; an image of Emu3-Gen is ~8k of them.
SJD keeps a window of drafted future tokens and feeds the last settled token plus the drafts in one forward. The
forward's outputs at the window positions verify the drafts left to right with the speculative-sampling rule
(Leviathan et al. 2023; Chen et al. 2023, arXiv 2211.17192 / 2302.01318):

    accept draft x with probability min(1, p(x) / q(x))
    on the first rejection, draw the token from norm(max(0, p - q)) and stop

where p is the model's distribution at that position given the settled prefix (CFG, constraint, temperature,
top-k/top-p applied: exactly what plain decoding samples from) and q the distribution the draft was drawn from.
Whatever q is, every settled token is then distributed as p: the output distribution is that of plain decoding
(tests/test_speed.py checks it against the exact distribution of a tiny model). If every draft is accepted, the
last output gives one more token for free. The drafts are Jacobi iterates: after a forward, the positions past
the settled prefix are redrawn from that forward's own outputs (q = those outputs), and new positions at the
window's end start from the last output's distribution under their own constraint. Images change slowly from
token to token, so drafts drawn from a neighbour's distribution are often accepted; that is all SJD relies on.

How it composes with the rest of nano_emu:
- Greedy (temperature 0): p and q are one-hot, so a draft is accepted exactly when it is the argmax and a
  rejection yields the argmax: the tokens of plain greedy decoding (Jacobi decoding, Song et al. 2021).
- Batched CFG: both halves of [cond; uncond] are fed the same window; p is the mixed distribution per image.
- Several images in a batch share the cache slots, so the batch advances by the SHORTEST settled run: images
  that settled more keep only that many (an accepted token is a correct draw whether or not the ones after it
  are kept) and redraw the rest as fresh drafts. Per-image windows would waste fewer forwards but need per-row
  cache slots; the min keeps one static cache and one position per step.
- Grid constraint: structural tokens (EOL, EOF, EOI, EOS) have a one-hot p and are drafted from a one-hot q on
  the same token, so they are never a guess and always accepted.
- Static cache: the window is written at its slots; slots past the settled prefix hold rejected drafts until the
  next window overwrites them, and the causal mask hides them meanwhile. The window always has the same length
  (near the end it slides back over settled tokens, rewriting their keys with the same values), so one
  compiled step serves the whole image.
- Cost: one host sync per forward (the settled length decides where the next window starts), against one
  forward per token without SJD.
"""

from typing import Iterator

import torch
import torch.nn.functional as F

from .sampler import Decoder, GridConstraint, cfg_mix, draw, probabilities


def accept(p_draft: torch.Tensor, q_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling test: True where u < p(x) / q(x), written without dividing (q(x) > 0 for any
    drawn x). Its own function so a test can swap in a wrong rule and see the distribution test fail."""
    return uniform * q_draft < p_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected position draws from: norm(max(0, p - q)), the part of p that q under-proposed (draw
    normalises). Its own function for the same reason as accept."""
    return (p - q).clamp(min=0)


def jacobi_decode(decoder: Decoder, layout, constraint: GridConstraint, prompts: list[list[int]], constrain: bool,
                  batch: int, cfg_scale: float | None, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None, window: int = 16) -> Iterator[tuple[torch.Tensor, int]]:
    """sampler._decode's contract with a window of `window` tokens per forward: yields (tokens so far (B, n),
    rows done) whenever rows were finished. prompts holds the batch's prompts then, with CFG, their negatives."""
    n_new = len(constraint)
    window = min(window, n_new - 1)   # tokens fed per forward; the last token is never fed, as in _decode
    if window < 2:
        raise ValueError(f"speculative Jacobi decoding needs a window of at least 2 tokens, got {window}")
    vocab = decoder.model.config.vocab_size
    device = decoder.device

    def guide(logits: torch.Tensor) -> torch.Tensor:
        """Logits (rows, T, V) -> guided log-probabilities (B, T, V), as _decode mixes them."""
        logprobs = F.log_softmax(logits, dim=-1)
        if cfg_scale is not None:
            cond, uncond = logprobs.split(batch)
            logprobs = cfg_mix(cond, uncond, cfg_scale)
        return logprobs

    def finish(logprobs: torch.Tensor, first: int) -> torch.Tensor:
        """Guided log-probabilities (B, T, V) of tokens first..first+T-1 -> the distributions _decode samples."""
        if constrain:
            logprobs = constraint.window(logprobs, first)
        return probabilities(logprobs, temperature, top_k, top_p)

    logits, length = decoder.prefill(prompts, layout.pad, n_new)
    mixed = guide(logits[:, None])                                            # (B, 1, V) for token 0
    tokens = torch.full((batch, n_new), layout.pad, dtype=torch.long, device=device)   # settled, then drafts
    tokens[:, 0] = draw(finish(mixed, 0), generator)[:, 0]
    settled = 1
    # drafts for tokens 1 .. window-1, from token 0's distribution under each position's own constraint
    q = finish(mixed.expand(batch, window - 1, vocab), 1)                       # (B, window-1, V)
    tokens[:, 1:window] = draw(q, generator)
    offsets = torch.arange(window, device=device)
    eol_steps = [s for s, kind in enumerate(constraint.schedule) if kind == layout.eol]
    rows_done = 0

    while settled < n_new:
        # feed tokens start .. start+window-1: the last settled token, then the drafts (near the end the window
        # slides back over settled tokens so its length stays fixed; their keys are rewritten with the same values)
        start = min(settled - 1, n_new - 1 - window)
        fed = tokens[:, start:start + window]                                   # (B, window)
        logits = decoder.step(fed.repeat(len(prompts) // batch, 1), length + start + offsets, every_position=True)
        mixed = guide(logits)                                                  # (B, window, V): tokens start+1..
        first = settled - start - 1                  # the output that predicts token `settled`
        p = finish(mixed[:, first:], settled)                                   # (B, n_drafts + 1, V)
        n_drafts = p.size(1) - 1                     # tokens settled .. settled+n_drafts-1 were drafted and fed
        drafts = tokens[:, settled:settled + n_drafts]                          # (B, n_drafts)
        p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]              # (B, n_drafts)
        q_draft = q[:, :n_drafts].gather(-1, drafts[..., None])[..., 0]
        uniform = torch.rand(drafts.shape, generator=generator, device=device)
        run = accept(p_draft, q_draft, uniform).long().cumprod(-1).sum(-1)     # (B,) drafts accepted in a row
        n_settle = int(run.min()) + 1                # the one sync per forward: where the next window starts
        k = n_settle - 1                             # the batch's first rejection (or the free token)
        # images that rejected at k draw from norm(max(0, p - q)); past the drafts (all accepted) there is no q:
        # the free token is drawn from p
        fresh = draw(residual(p[:, k], q[:, k]) if k < n_drafts else p[:, k], generator)   # (B,)
        if k < n_drafts:
            fresh = torch.where(run > k, drafts[:, k], fresh)   # images that accepted token k keep it
        tokens[:, settled + k] = fresh
        settled += n_settle

        # new drafts for tokens settled .. settled+window-2 (the next window's), never the last token alone
        n_next = min(window - 1, n_new - 1 - settled)
        if n_next > 0:
            reuse = p[:, n_settle:n_settle + n_next]     # this forward's outputs past the settled prefix
            extra = n_next - reuse.size(1)               # positions no output reached yet: start from the last one
            if extra > 0:
                last = mixed[:, -1:].expand(batch, extra, vocab)
                reuse = torch.cat([reuse, finish(last, settled + reuse.size(1))], dim=1)
            q = reuse                                                          # (B, n_next, V)
            tokens[:, settled:settled + n_next] = draw(q, generator)

        finished = [s for s in eol_steps if s < settled]
        if len(finished) > rows_done:
            rows_done = len(finished)
            if rows_done < len(eol_steps):   # the last row is reported with the final tokens
                yield tokens[:, :finished[-1] + 1], rows_done
    yield tokens, rows_done
