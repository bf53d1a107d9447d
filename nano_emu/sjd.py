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
(tests/test_sjd.py checks it against the exact distribution of a tiny model). If every draft is accepted, the
last output gives one more token for free. The drafts are Jacobi iterates: after a forward, the positions past
the settled prefix are redrawn from that forward's own outputs (q = those outputs), and new positions at the
window's end start from the last output's distribution under their own constraint. Images change slowly from
token to token, so drafts drawn from a neighbour's distribution are often accepted; that is all SJD relies on.

How it composes with the rest of nano_emu:
- Greedy (temperature 0): p and q are one-hot, so a draft is accepted exactly when it is the argmax and a
  rejection yields the argmax: the tokens of plain greedy decoding (Jacobi decoding, Song et al. 2021).
- Batched CFG: every branch ([cond; uncond], or Chameleon's 3-way [cond; image-only; uncond]) is fed the same
  window; p is ImageJob.distribution (sampler.Guidance's scores, then Sampling's filters) per image and
  position, the very function the plain loop samples from,
  so every guidance option (Emu3's or LlamaGen's mix, cfg_interval, 3-way CFG, CD-K) and image completion
  (`keep`: the kept tokens are settled from the start) hold here too.
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
- Coupled drafts (MC-SJD, arXiv 2510.24211): plain SJD redraws every draft past the settled prefix independently
  from the new forward's q', so a draft that was right moves away by chance. With coupled=True the old draft x
  (drawn from the old q) is kept with probability min(1, q'(x) / q(x)), else the draft is drawn from
  norm(max(0, q' - q)): a maximal coupling, so the new draft is still distributed exactly as q' (the same rule as
  verification, applied between iterations) and the drafts stay put where the distributions barely moved. What
  verification needs, a draft drawn from the q it is tested against, is unchanged: the output is still exact.
- Cost: one host sync per forward (the settled length decides where the next window starts), against one
  forward per token without SJD.
"""

from typing import Iterator

import torch

from .sampler import ImageJob, sample_from


def accept(p_draft: torch.Tensor, q_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling test: True where u < p(x) / q(x), written without dividing (q(x) > 0 for any
    drawn x). Its own function so a test can swap in a wrong rule and see the distribution test fail."""
    return uniform * q_draft < p_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected position draws from: norm(max(0, p - q)), the part of p that q under-proposed (sample_from
    normalises). Its own function for the same reason as accept."""
    return (p - q).clamp(min=0)


def couple(old: torch.Tensor, q_old: torch.Tensor, q_new: torch.Tensor, generator=None) -> torch.Tensor:
    """A draw from q_new (..., V) that keeps `old` (...), a draw from q_old, as often as any such draw can: keep it
    where u < q_new(old) / q_old(old), else draw from norm(max(0, q_new - q_old)). Its own function so a test can
    swap in a wrong rule and see the distribution test fail."""
    keep = accept(q_new.gather(-1, old[..., None])[..., 0], q_old.gather(-1, old[..., None])[..., 0],
                  torch.rand(old.shape, generator=generator, device=old.device))
    rest = residual(q_new, q_old)
    # where q_new == q_old the residual is empty, and the old draft is always kept: draw from anything non-zero
    rest = torch.where(rest.sum(-1, keepdim=True) > 0, rest, q_new)
    return torch.where(keep, old, sample_from(rest, generator))


def jacobi_decode(job: ImageJob, window: int = 16, coupled: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """sampler.plain_decode's contract with a window of `window` tokens per forward: yields (tokens so far (B, n),
    rows done) whenever rows were finished. Pass it to generate_image_stream as
    `loop=functools.partial(jacobi_decode, window=n)`; coupled=True redraws drafts by couple() (MC-SJD)."""
    engine, constraint, row_ends, generator = job.engine, job.constraint, job.row_ends, job.generator
    n_new, start, batch = len(constraint), job.kept.size(1), job.kept.size(0)
    window = min(window, n_new - 1)   # tokens fed per forward; the last token is never fed, as in plain_decode
    if window < 2:
        raise ValueError(f"speculative Jacobi decoding needs a window of at least 2 tokens, got {window}")
    device = engine.device

    def propose(reuse: torch.Tensor, last_logits: torch.Tensor, q_old: torch.Tensor | None = None) -> torch.Tensor:
        """Draw the drafts of the next window, tokens settled .. settled+window-2 (never the last token alone):
        from this forward's distributions past the settled prefix (reuse (B, r, V)), and where no output reached
        yet from the last output's logits (rows, 1, V) under each position's own rules. Returns their q. With
        q_old (the q of the drafts now at settled.., coupled decoding) those drafts are redrawn by couple()."""
        n_next = max(0, min(window - 1, n_new - 1 - settled))
        q = reuse[:, :n_next]
        if n_next > q.size(1):
            last = last_logits.expand(-1, n_next - q.size(1), -1)
            q = torch.cat([q, job.distribution(last, settled + q.size(1))], dim=1)      # (B, n_next, V)
        if n_next:
            drafts = sample_from(q, generator)                                  # (B, n_next)
            n_old = 0 if q_old is None else min(q_old.size(1), n_next)
            if n_old:
                drafts[:, :n_old] = couple(tokens[:, settled:settled + n_old], q_old[:, :n_old], q[:, :n_old],
                                           generator)
            tokens[:, settled:settled + n_next] = drafts
        return q

    logits, length = engine.prefill(job.prompts, job.pad, n_new - start)
    first_slot = length - start                  # the cache slot of token 0 (kept tokens sit before `length`)
    tokens = torch.full((batch, n_new), job.pad, dtype=torch.long, device=device)   # settled, then drafts
    tokens[:, :start] = job.kept
    p = job.distribution(logits[:, None], start)                                # (B, 1, V)
    tokens[:, start] = sample_from(p, generator)[:, 0]
    settled = start + 1
    q = propose(p[:, 1:], logits[:, None])
    offsets = torch.arange(window, device=device)
    rows_done = sum(end < settled for end in row_ends)

    while settled < n_new:
        # feed tokens s .. s+window-1: the last settled token, then the drafts (near the end the window slides
        # back over settled tokens so its length stays fixed; their keys are rewritten with the same values)
        s = min(settled - 1, n_new - 1 - window)
        fed = tokens[:, s:s + window]                                           # (B, window)
        logits = engine.step(fed.repeat(job.guidance.branches, 1), first_slot + s + offsets, every_position=True)
        first = settled - s - 1                      # the output that predicts token `settled`
        p = job.distribution(logits[:, first:], settled)                        # (B, n_drafts + 1, V)
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
        fresh = sample_from(residual(p[:, k], q[:, k]) if k < n_drafts else p[:, k], generator)   # (B,)
        if k < n_drafts:
            fresh = torch.where(run > k, drafts[:, k], fresh)   # images that accepted token k keep it
        tokens[:, settled + k] = fresh
        settled += n_settle
        q = propose(p[:, n_settle:], logits[:, -1:], q[:, n_settle:] if coupled else None)

        finished = [end for end in row_ends if end < settled]
        if len(finished) > rows_done:
            rows_done = len(finished)
            if rows_done < len(row_ends):   # the last row is reported with the final tokens
                yield tokens[:, :finished[-1] + 1], rows_done
    yield tokens, rows_done
