"""Autoregressive sampling: prefill, one-token decode steps, classifier-free guidance, grid constraints.

An image is drawn one token at a time after the prompt `BOS caption BOI "h*w" IMG`:
1. prefill: the (left-padded) prompts go through the GPT once, filling the static KV cache;
2. each step: log-probabilities of the next token -> CFG mix -> grid constraint -> temperature / top-k /
   top-p -> sample; the token is fed back as a one-token decode step.

Three small objects carry the options, so they are written once and travel as one argument each:
- `Guidance` (frozen): how the branches' logits become one score table -- the CFG mix and its scale, Chameleon's
  3-way mix, CM3Leon's CD-K;
- `Sampling` (frozen): how a score table becomes a token -- temperature, top-k, top-p; it checks its values,
  for the command line and the Python API alike;
- `engine.Engine`: the model, its KV cache and its (optionally compiled) decode step, with one owner.
The loop that spends the forwards is passed in too: `plain_decode` here (one forward per token, gpt-fast's loop)
or `sjd.jacobi_decode` (several tokens per forward, same distribution). gpt-fast keeps its speculative loop next
to the plain one the same way; this module never imports sjd.py, which builds on it.

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

Chameleon / Anole add two options on the same loop. A 3-way CFG (`image_prompts`, `Guidance.image_scale`): the
batch is [full prompt; image-only prompt; unconditional] and the mix is InstructPix2Pix's, uncond + s_img *
(image - uncond) + s_txt * (full - image) (Chameleon's reference ImageDecoder: s_img 1.2, s_txt 3.0). And
CM3Leon's contrastive decoding with top-K (`Guidance.cdk_k`, see `cdk_scores`) in place of the CFG mix, for every
family. `keep` starts the image from given first rows (image completion): they are appended to every branch's
prompt and the loop continues from there.
Sampling functions are small and pure, with an explicit torch.Generator, so a seed reproduces an image on CPU;
`probabilities` is the distribution `sample` draws from, which speculative decoding needs to see whole.
"""

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .engine import Engine
from .layout import VISUAL, Layout

# ---------------------------------------------------------------------------------------------------------------
# guidance: the branches' logits -> one score table


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


def _finite(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Guidance:
    """How the branches' next-token logits become one score table per image: the CFG mix (Emu3's on log-probs or
    LlamaGen's on logits, with cfg_interval), Chameleon's 3-way mix, or CD-K; then the grid constraint. The batch
    holds B rows per branch, [cond; image-only (3-way only); uncond (guided only)]. One rule for a decode step
    (T = 1) and for a speculative window (T tokens), so sjd.py verifies against exactly what plain decoding
    samples from. Guidance() is unguided sampling."""

    cfg_scale: float = 1.0               # 1 = no guidance; 3-way: the text scale
    cfg_on: str = "logprobs"             # or "logits" (LlamaGen)
    cfg_interval: int = -1               # >= 0: guide only steps 0 .. cfg_interval + 1 (LlamaGen)
    image_scale: float | None = None     # 3-way CFG: an image-only branch sits in the middle
    cdk_k: int | None = None             # CD-K against the unconditional branch instead of a CFG mix
    cdk_alpha: float = 0.1

    def __post_init__(self):
        _finite("cfg_scale", self.cfg_scale)
        if self.cfg_on not in ("logprobs", "logits"):
            raise ValueError(f"cfg_on must be 'logprobs' (Emu3) or 'logits' (LlamaGen), got {self.cfg_on!r}")
        if not isinstance(self.cfg_interval, int) or self.cfg_interval < -1:
            raise ValueError(f"cfg_interval must be an integer >= -1 (-1: guide every step), got {self.cfg_interval!r}")
        if self.image_scale is not None:
            _finite("image_scale", self.image_scale)
        if self.cdk_k is not None and (not isinstance(self.cdk_k, int) or self.cdk_k < 1):
            raise ValueError(f"cdk_k must be an integer >= 1, got {self.cdk_k!r}")
        if not 0 < self.cdk_alpha <= 1:
            raise ValueError(f"cdk_alpha must be in (0, 1], got {self.cdk_alpha!r}")

    @property
    def guided(self) -> bool:
        """An unconditional branch follows the conditional one (CFG, 3-way CFG or CD-K)."""
        return self.cfg_scale != 1.0 or self.image_scale is not None or self.cdk_k is not None

    @property
    def branches(self) -> int:
        return 1 + (self.image_scale is not None) + self.guided

    def __call__(self, logits: torch.Tensor, first_step: int, constraint: "GridConstraint | None") -> torch.Tensor:
        """logits (branches * B, T, V) of the tokens at offsets first_step .. first_step+T-1 after IMG -> the
        scores (B, T, V) that temperature / top-k / top-p and the draw work on."""
        batch = logits.size(0) // self.branches
        fit = (lambda x: x) if constraint is None else (lambda x: constraint.window(x, first_step))
        if self.cdk_k is not None:   # CD-K on log-probabilities over what the constraint allows
            cond, uncond = fit(logits[:batch]), fit(logits[-batch:])
            return fit(cdk_scores(F.log_softmax(cond, -1), F.log_softmax(uncond, -1), self.cdk_k, self.cdk_alpha))
        scores = logits if self.cfg_on == "logits" else F.log_softmax(logits, dim=-1)
        if self.image_scale is not None:
            scores = cfg_mix3(*scores.split(batch), text_scale=self.cfg_scale, image_scale=self.image_scale)
        elif self.guided:
            cond, uncond = scores.split(batch)
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


# ---------------------------------------------------------------------------------------------------------------
# sampling: a score table -> a token


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


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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
    return sample_from(probabilities(logits, temperature, top_k, top_p), generator)


@dataclass(frozen=True)
class Sampling:
    """How a score table becomes a token: temperature (0 = greedy), top-k, top-p (None = off). Checked here, so the
    Python API refuses what the command line refuses (a negative or NaN temperature would otherwise draw black
    images, top_k=0 fail deep inside with a tensor-size error)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        _finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for off), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None for off), got {self.top_p!r}")

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return probabilities(scores, self.temperature, self.top_k, self.top_p)

    def sample(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample(scores, generator, self.temperature, self.top_k, self.top_p)


GREEDY = Sampling(temperature=0.0)


class GridConstraint:
    """The precomputed constraint table: `allowed[kind]` is a vocabulary mask and `kind_at[step]` says which
    mask applies at each offset after IMG. Applying it is one masked_fill per step."""

    def __init__(self, layout: Layout, h: int, w: int, t: int = 1, vocab_size: int | None = None, device=None):
        self.schedule = layout.grid_schedule(h, w, t)
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


# ---------------------------------------------------------------------------------------------------------------
# drawing images


class ImageJob(NamedTuple):
    """What a decode loop is asked to do: every branch's prompts stacked as Guidance expects, the first tokens
    given (kept (B, start): image completion), the constraint table (its schedule sets the length; it masks the
    scores only if constrain), the offsets that end a row, and the options."""
    engine: Engine
    prompts: list[list[int]]
    kept: torch.Tensor
    constraint: GridConstraint
    constrain: bool
    row_ends: list[int]
    guidance: Guidance
    sampling: Sampling
    generator: torch.Generator | None
    pad: int
    record: list | None = None   # a list: the loop appends (B, n) log-probs of its drawn tokens (plain_decode only)

    def distribution(self, logits: torch.Tensor, first_step: int) -> torch.Tensor:
        """Logits (rows, T, V) for the tokens at offsets first_step.. -> what they are drawn from (B, T, V)."""
        return self.sampling.probabilities(self.guidance(logits, first_step, self.mask))

    @property
    def mask(self) -> GridConstraint | None:
        return self.constraint if self.constrain else None


Loop = Callable[[ImageJob], Iterator[tuple[torch.Tensor, int]]]


def plain_decode(job: ImageJob) -> Iterator[tuple[torch.Tensor, int]]:
    """The plain loop: one forward per token, yields (tokens so far (B, n), rows done) at every row end.
    Nothing in it waits for the device: the cache slot advances in place, the constraint is a lookup into a
    device table, and which steps end a row is known from the schedule, so a GPU runs ahead of Python."""
    n_new, start, batch = len(job.constraint), job.kept.size(1), job.kept.size(0)
    logits, length = job.engine.prefill(job.prompts, job.pad, n_new - start)
    out = torch.full((batch, n_new), job.pad, dtype=torch.long, device=logits.device)
    out[:, :start] = job.kept
    logprobs = torch.zeros(batch, n_new, device=logits.device) if job.record is not None else None
    input_pos = torch.tensor([length], device=logits.device)   # the cache slot of the token fed next
    rows_done = sum(end < start for end in job.row_ends)
    row_ends = set(job.row_ends)
    for step in range(start, n_new):
        scores = job.guidance(logits[:, None], step, job.mask)[:, 0]           # (B, V)
        if logprobs is not None:   # the same draw as Sampling.sample, from the distribution it keeps the log-prob of
            weights = job.sampling.probabilities(scores)                       # (B, V)
            token = weights.argmax(-1) if job.sampling.temperature == 0 else sample_from(weights, job.generator)
            logprobs[:, step] = weights.gather(-1, token[:, None])[:, 0].log()
        else:
            token = job.sampling.sample(scores, job.generator)                 # (B,)
        out[:, step] = token
        if step + 1 < n_new:   # nothing comes after the last token, so it needs no forward
            fed = token.repeat(job.guidance.branches)[:, None]                 # (rows, 1): every branch sees it
            logits = job.engine.step(fed, input_pos)
            input_pos += 1
        if step in row_ends:
            rows_done += 1
            if rows_done < len(row_ends):   # the last row is reported with the final tokens below
                yield out[:, :step + 1], rows_done
    if logprobs is not None:
        job.record.append(logprobs)
    yield out, rows_done


class Rows(NamedTuple):
    tokens: torch.Tensor        # (B, n) tokens generated after IMG so far
    codes: torch.Tensor | None  # (B, rows_done, w) codes of the finished rows (frames stacked); None unconstrained
    rows_done: int
    rows_total: int
    logprobs: torch.Tensor | None = None   # (B, n) log-prob of each token under what it was drawn from (record=True)
    plans: list[str] | None = None         # the plans the model wrote before drawing (a layout with plans)


@torch.inference_mode()
def generate_image_stream(model, layout: Layout, prompts: list[list[int]], h: int, w: int, t: int = 1,
                          negative_prompts: list[list[int]] | None = None,
                          image_prompts: list[list[int]] | None = None, guidance: Guidance = Guidance(),
                          sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                          constrain: bool = True, keep: torch.Tensor | None = None, engine: Engine | None = None,
                          loop: Loop = plain_decode, record: bool = False) -> Iterator[Rows]:
    """Draw len(prompts) images of h x w codes (or clips of t code frames); yields Rows after every finished row,
    the last one carrying every token through EOS. Prompts end with IMG (Layout.generation_prompt).
    negative_prompts: the unconditional branch, one per prompt, needed when guidance is guided (Emu3: a negative
    prompt; toy models: the empty caption). image_prompts: Chameleon's image-only branch (3-way CFG, with
    guidance.image_scale). keep: (B, r, w) codes of the first r rows, kept as given (image completion; images
    only). engine: an Engine of `model` to reuse (its cache, its compiled step); None makes one for this call.
    loop: plain_decode (one token per forward) or e.g. functools.partial(sjd.jacobi_decode, window=16).
    record: the last Rows also carries the log-prob of every drawn token under the distribution it was drawn from
    (guidance, constraint, temperature, top-k/p applied): what post-training needs of a rollout (plain_decode)."""
    batch = len(prompts)
    if record and loop is not plain_decode:
        raise ValueError("record=True keeps the log-probs of plain decoding; speculative loops do not record them")
    if guidance.guided and (negative_prompts is None or len(negative_prompts) != batch):
        raise ValueError(f"cfg_scale {guidance.cfg_scale} needs one negative (unconditional) prompt per prompt; "
                         f"pass negative_prompts, or cfg_scale=1 for unguided sampling")
    if (image_prompts is None) != (guidance.image_scale is None):
        raise ValueError("3-way CFG needs both image_prompts and Guidance(image_scale=...)")
    if image_prompts is not None and len(image_prompts) != batch:
        raise ValueError(f"3-way CFG needs one image-only prompt per prompt, got {len(image_prompts)} for {batch}")
    branches = [prompts] + ([image_prompts] if image_prompts is not None else []) + (
        [negative_prompts] if guidance.guided else [])
    engine = engine or Engine(model)
    constraint = GridConstraint(layout, h, w, t, model.config.vocab_size, engine.device)
    row_ends = layout.row_ends(h, w, t)
    kept = torch.empty(batch, 0, dtype=torch.long)
    if keep is not None:   # image completion: the kept rows, as the schedule writes them, extend every prompt
        if t != 1 or keep.dim() != 3 or keep.shape[0] != batch or keep.shape[2] != w or keep.shape[1] >= h:
            raise ValueError(f"keep must be (batch {batch}, r < {h} rows, {w}) codes of an image, got {tuple(keep.shape)}")
        start = row_ends[keep.shape[1] - 1] + 1 if keep.shape[1] else 0
        codes = iter(keep.flatten(1).T.tolist())   # one row of B codes per visual slot, in raster order
        columns = [[c + layout.first_visual for c in next(codes)] if kind == VISUAL else [kind] * batch
                   for kind in constraint.schedule[:start]]
        kept = torch.tensor(columns, dtype=torch.long).view(start, batch).T                  # (B, start)
        branches = [[p + kept[i].tolist() for i, p in enumerate(branch)] for branch in branches]
    recorded = [] if record else None
    job = ImageJob(engine, [p for branch in branches for p in branch], kept.to(engine.device), constraint,
                   constrain, row_ends, guidance, sampling, generator, layout.pad, recorded)
    visual_steps = torch.tensor([s for s, kind in enumerate(constraint.schedule) if kind == VISUAL],
                                device=engine.device)
    for tokens, rows_done in loop(job):
        codes = None
        if constrain:   # the structure is guaranteed, so the codes sit at the schedule's visual offsets
            done = visual_steps[:rows_done * w]
            codes = (tokens[:, done] - layout.first_visual).view(batch, rows_done, w)
        yield Rows(tokens, codes, rows_done, len(row_ends), recorded[0] if recorded else None)


def generate_image(model, layout: Layout, prompts: list[list[int]], h: int, w: int, t: int = 1,
                   repair: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Like generate_image_stream, but returns (tokens (B, n), codes (B, h, w), or (B, t, h, w) for t > 1).
    The codes are read back through Layout.read_grid, which raises on a malformed grid (possible only with
    constrain=False) unless repair=True."""
    for rows in generate_image_stream(model, layout, prompts, h, w, t, **kwargs):
        pass
    codes = [layout.read_grid(row.tolist(), h, w, t, repair=repair)[0] for row in rows.tokens.cpu()]
    return rows.tokens, torch.stack(codes)


@torch.inference_mode()
def generate_text(model, layout: Layout, prompts: list[list[int]], max_new_tokens: int = 64,
                  sampling: Sampling = GREEDY, generator: torch.Generator | None = None,
                  allowed: torch.Tensor | None = None, engine: Engine | None = None,
                  stop: int | None = None) -> list[list[int]]:
    """Continue each prompt until EOS (or `stop`, e.g. a plan's EOP; not included in the result) or
    max_new_tokens; greedy by default, as Emu3-Chat. allowed: optional (V,) bool mask of tokens that may be
    generated (e.g. no visual tokens).
    Unlike an image, text has no schedule: whether every row has stopped is asked of the device each step."""
    engine = engine or Engine(model)
    stop = layout.eos if stop is None else stop
    logits, length = engine.prefill(prompts, layout.pad, max_new_tokens)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    input_pos = torch.tensor([length], device=logits.device)
    out = []
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(logits.float(), dim=-1)
        if allowed is not None:
            logprobs = logprobs.masked_fill(~allowed, float("-inf"))
        token = sampling.sample(logprobs, generator)
        token = token.masked_fill(finished, layout.pad)   # rows that hit EOS keep feeding padding
        out.append(token)
        finished |= token == stop
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        logits = engine.step(token[:, None], input_pos)
        input_pos += 1
    rows = torch.stack(out, dim=1).tolist()
    return [row[:row.index(stop)] if stop in row else row for row in rows]
