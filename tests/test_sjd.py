"""Speculative Jacobi decoding (SJD): the tokens of greedy decoding for every option of every family, and the
distribution of plain sampling (checked against the exact distribution of a tiny model, with a demonstration that
wrong acceptance rules fail the same check)."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nano_emu import sjd
from nano_emu.engine import Engine
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import VISUAL, Layout
from nano_emu.sampler import (GREEDY, GridConstraint, Guidance, Sampling, cfg_mix, generate_image,
                              generate_image_stream, plain_decode, probabilities)
from test_engine import CFG3, L, jacobi, one_thread, prompts, tiny_gpt, tok  # noqa: F401  (one_thread: a fixture)


# ------------------------------------------------------------------------------------ SJD: greedy


@pytest.mark.parametrize("window", [2, 5, 16])
@pytest.mark.parametrize("t", [1, 3])
def test_sjd_greedy_gives_the_tokens_of_greedy_decoding(window, t):
    model = tiny_gpt(seed=2)
    p, n = prompts("a red circle", "a blue square", t=t), prompts("", "", t=t)
    kw = dict(t=t, negative_prompts=n, guidance=CFG3, sampling=GREEDY)
    plain, plain_codes = generate_image(model, L, p, 3, 4, **kw)
    engine = Engine(model)
    fast, fast_codes = generate_image(model, L, p, 3, 4, engine=engine, loop=jacobi(window), **kw)
    assert torch.equal(fast, plain) and torch.equal(fast_codes, plain_codes)
    assert engine.forwards < len(L.grid_schedule(3, 4, t))   # structural tokens alone make it faster


def test_sjd_greedy_without_the_grid_constraint():
    """Unconstrained, nothing is known in advance: every token is drafted, structural ones included."""
    model = tiny_gpt(seed=3)
    p, n = prompts("a red circle"), prompts("")
    run = lambda **kw: list(generate_image_stream(model, L, p, 3, 4, negative_prompts=n, guidance=CFG3,
                                                  sampling=GREEDY, constrain=False, **kw))[-1].tokens
    assert torch.equal(run(loop=jacobi(4)), run())


def test_sjd_streams_the_same_rows_and_composes_with_top_k():
    model = tiny_gpt()
    kw = dict(t=2, negative_prompts=prompts("", "", t=2), guidance=CFG3, sampling=Sampling(0.7, top_k=5))
    stream = list(generate_image_stream(model, L, prompts("a", "b", t=2), 3, 4, loop=jacobi(6),
                                        generator=torch.Generator().manual_seed(3), **kw))
    assert [r.rows_done for r in stream] == sorted({r.rows_done for r in stream}) and stream[-1].rows_done == 6
    for earlier, later in zip(stream, stream[1:]):
        assert torch.equal(later.codes[:, :earlier.rows_done], earlier.codes)
    final = stream[-1].tokens
    assert final.shape == (2, len(L.grid_schedule(3, 4, 2)))
    for row in final.tolist():
        L.read_grid(row, 3, 4, 2)   # a valid grid (raises otherwise)


# ------------------------------------------------------------------------------------ SJD: the distribution

SMALL = Layout.tiny(codebook_size=4)   # 4 codes, a 2x2 grid: 4 visual positions, 256 possible images
H = W = 2
G, TEMPERATURE, TOP_K = 2.0, 1.0, 3


@torch.no_grad()
def exact_marginals(model, cond, uncond):
    """P(code at each visual position) for plain sampling, by walking the tree of every prefix with full
    recomputes (no cache, no sampler loop): (4 positions, 4 codes)."""
    constraint = GridConstraint(SMALL, H, W)
    prefixes, marginals = [([], 1.0)], []
    for step in range(len(constraint)):
        c = F.log_softmax(model(torch.tensor([cond + p for p, _ in prefixes]))[:, -1], -1)
        u = F.log_softmax(model(torch.tensor([uncond + p for p, _ in prefixes]))[:, -1], -1)
        probs = probabilities(constraint(cfg_mix(c, u, G), step), TEMPERATURE, TOP_K)   # (prefixes, V)
        weights = torch.tensor([w for _, w in prefixes], dtype=torch.float64)
        marginals.append((weights[:, None] * probs.double()).sum(0))
        prefixes = [(p + [t], w * float(probs[i, t])) for i, (p, w) in enumerate(prefixes)
                    for t in probs[i].nonzero()[:, 0].tolist()]
    visual = [s for s, kind in enumerate(constraint.schedule) if kind == VISUAL]
    return torch.stack(marginals)[visual][:, SMALL.first_visual:]


def code_counts(model, cond, uncond, window, calls, batch, seed=0, coupled=False):
    """Counts (4 positions, 4 codes) of calls x batch images; and forwards per call."""
    loop = partial(sjd.jacobi_decode, window=window, coupled=coupled) if window else plain_decode
    counts, engine = torch.zeros(H * W, SMALL.codebook_size, dtype=torch.float64), Engine(model)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(calls):
        _, codes = generate_image(model, SMALL, [cond] * batch, H, W, negative_prompts=[uncond] * batch,
                                  guidance=Guidance(cfg_scale=G), sampling=Sampling(TEMPERATURE, top_k=TOP_K),
                                  loop=loop, generator=generator, engine=engine)
        counts += F.one_hot(codes.view(batch, H * W), SMALL.codebook_size).sum(0)
    return counts, engine.forwards / calls


def chi_square(counts, exact):
    """Pearson's statistic of per-position code counts against the exact marginals, and the 0.999 quantile of its
    null distribution (Wilson-Hilferty). Codes of probability 0 must never be drawn (-> infinite statistic);
    codes expected fewer than 5 times are pooled so the chi-square approximation holds."""
    if (counts[exact == 0] > 0).any():
        return math.inf, 0.0
    n = counts[0].sum()
    statistic, dof = 0.0, 0
    for observed, p in zip(counts, exact):
        expected = n * p
        big = expected >= 5
        obs = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)])
        exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
        keep = exp > 0
        statistic += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        dof += int(keep.sum()) - 1
    z = 3.09   # the standard normal's 0.999 quantile
    quantile = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return statistic, quantile


def test_sjd_samples_the_distribution_of_plain_sampling(monkeypatch):
    """Per-position code frequencies of many SJD images (CFG 2, top-k 3 of 4, temperature 1) against the exact
    marginals of plain sampling. Batches of 2 and 6 images exercise both multi-token acceptance and the batch's
    shared (shortest) settled run. The same check run on plain sampling shows the exact marginals are right,
    and run on two wrong rules shows it has the power to catch them."""
    model = tiny_gpt(SMALL, seed=0, scale=30.0)
    cond, uncond = prompts("a red circle", h=H, w=W, layout=SMALL)[0], prompts("", h=H, w=W, layout=SMALL)[0]
    exact = exact_marginals(model, cond, uncond)
    assert (exact.max(-1).values < 0.95).all()   # not degenerate: every position is a real draw

    counts, _ = code_counts(model, cond, uncond, 0, calls=50, batch=30)
    statistic, threshold = chi_square(counts, exact)
    assert statistic < threshold, f"plain sampling: chi2 {statistic:.1f} >= {threshold:.1f}"

    forwards = []
    for batch, calls in ((2, 400), (6, 150)):
        counts, per_call = code_counts(model, cond, uncond, 4, calls=calls, batch=batch, seed=batch)
        statistic, threshold = chi_square(counts, exact)
        assert statistic < threshold, f"SJD, batch {batch}: chi2 {statistic:.1f} >= {threshold:.1f}"
        forwards.append(per_call)
    plain_forwards = len(SMALL.grid_schedule(H, W))   # prefill + one per token but the last
    assert forwards[0] < 0.75 * plain_forwards      # drafts were really accepted, several per forward

    # the test's power: accepting every draft (Jacobi iteration without verification), or verifying correctly but
    # drawing a rejected position from p instead of norm(max(0, p - q)), both fail
    # (measured when written: plain 16.3, SJD 5.5 and 7.2, always accept inf (it draws codes of probability 0),
    # resample from p 88.5, against a 0.999 quantile of 29.8 with 10 degrees of freedom)
    wrong_rules = {"always accept": ("accept", lambda p, q, u: torch.ones_like(p, dtype=torch.bool), 150),
                   "resample from p": ("residual", lambda p, q: p, 300)}
    for name, (function, wrong, calls) in wrong_rules.items():
        monkeypatch.setattr(sjd, function, wrong)
        counts, _ = code_counts(model, cond, uncond, 4, calls=calls, batch=2, seed=1)
        statistic, threshold = chi_square(counts, exact)
        assert statistic > threshold, f"{name}: chi2 {statistic:.1f} < {threshold:.1f}, the check is too weak"
        monkeypatch.undo()


def test_coupled_sjd_samples_the_distribution_of_plain_sampling(monkeypatch):
    """MC-SJD's coupled redraw of drafts keeps the output exact: the same chi-square check as above, and two wrong
    couplings (keeping every old draft; redrawing a changed one from q' instead of norm(max(0, q' - q))) fail it."""
    model = tiny_gpt(SMALL, seed=0, scale=30.0)
    cond, uncond = prompts("a red circle", h=H, w=W, layout=SMALL)[0], prompts("", h=H, w=W, layout=SMALL)[0]
    exact = exact_marginals(model, cond, uncond)
    for batch, calls in ((2, 400), (6, 150)):
        counts, _ = code_counts(model, cond, uncond, 4, calls=calls, batch=batch, seed=batch, coupled=True)
        statistic, threshold = chi_square(counts, exact)
        assert statistic < threshold, f"coupled SJD, batch {batch}: chi2 {statistic:.1f} >= {threshold:.1f}"
    wrong_rules = {"always keep": lambda old, q_old, q_new, generator=None: old,
                   "redraw from q'": lambda old, q_old, q_new, generator=None: torch.where(
                       torch.rand(old.shape, generator=generator) < 0.5, old, sjd.sample_from(q_new, generator))}
    for name, wrong in wrong_rules.items():
        monkeypatch.setattr(sjd, "couple", wrong)
        counts, _ = code_counts(model, cond, uncond, 4, calls=300, batch=2, seed=1, coupled=True)
        statistic, threshold = chi_square(counts, exact)
        assert statistic > threshold, f"{name}: chi2 {statistic:.1f} < {threshold:.1f}, the check is too weak"
        monkeypatch.undo()


@pytest.mark.parametrize("window", [2, 5, 16])
def test_coupled_sjd_greedy_gives_the_tokens_of_greedy_decoding(window):
    model = tiny_gpt(seed=2)
    p, n = prompts("a red circle", "a blue square", t=2), prompts("", "", t=2)
    kw = dict(t=2, negative_prompts=n, guidance=CFG3, sampling=GREEDY)
    plain, _ = generate_image(model, L, p, 3, 4, **kw)
    fast, _ = generate_image(model, L, p, 3, 4, loop=partial(sjd.jacobi_decode, window=window, coupled=True), **kw)
    assert torch.equal(fast, plain)


# ------------------------------------------------------------------------------------ other families' options


def test_sjd_and_compile_give_llamagens_reference_tokens():
    """LlamaGen's options (class token, 2-D RoPE, raw-logit CFG, cfg_interval) through SJD and the compiled step:
    the reference's greedy tokens (tests/fixtures/llamagen). With cfg_interval 3 a window straddles the last
    guided step, so SJD applies guidance per position inside one window."""
    from test_llamagen import FIXTURE, GOLDEN, TINY

    import nano_emu
    pipe = nano_emu.load_llamagen(FIXTURE / "gpt.pt", FIXTURE / "vq.pt", **TINY)
    for name, interval in [("cfg", -1), ("cfg_interval3", 3)]:
        for window in (2, 4, 16):
            *_, rows = pipe.draw_stream(["3", "7"], cfg_scale=4.0, temperature=0, cfg_interval=interval, sjd=window)
            assert torch.equal(rows.tokens, GOLDEN[f"greedy_{name}"]), (name, window)
    pipe.compile = True
    *_, rows = pipe.draw_stream(["3", "7"], cfg_scale=4.0, temperature=0, cfg_interval=3)
    assert torch.equal(rows.tokens, GOLDEN["greedy_cfg_interval3"])


def chameleon_gpt(layout):
    torch.manual_seed(1)
    vocab = max(layout.vocab_size, 512)   # Chameleon's BOI/EOI ids lie past its codes
    model = GPT(GPTConfig.tiny(vocab, n_layer=2, dim=64, n_head=4, n_kv_head=2, intermediate_size=128,
                               max_seq_len=256, qk_norm=True)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.mark.parametrize("layout", [Layout.chameleon(eoi=300, boi=301, codebook_size=64, image_grid=(3, 4)), L],
                         ids=["chameleon", "emu3"])
def test_sjd_greedy_with_three_way_cfg_cdk_and_completion(layout):
    """Chameleon's options through SJD, greedy: 3-way CFG (with an image-only branch that differs from the
    unconditional one), CD-K, and completion from kept rows give the tokens of the plain loop."""
    model = chameleon_gpt(layout)
    p = [layout.generation_prompt(c, 3, 4, tok) for c in ("a red circle", "b")]
    n = [layout.generation_prompt("", 3, 4, tok)] * 2
    image_only = [layout.generation_prompt("xy", 3, 4, tok)] * 2
    options = {"3-way": dict(negative_prompts=n, image_prompts=image_only, guidance=Guidance(3.0, image_scale=1.2)),
               "cd-k": dict(negative_prompts=n, guidance=Guidance(3.0, cdk_k=4)),
               "logits": dict(negative_prompts=n, guidance=Guidance(3.0, cfg_on="logits"))}
    for name, kw in options.items():
        plain, plain_codes = generate_image(model, layout, p, 3, 4, sampling=GREEDY, **kw)
        for window in (3, 8):
            fast, fast_codes = generate_image(model, layout, p, 3, 4, sampling=GREEDY, loop=jacobi(window), **kw)
            assert torch.equal(fast, plain) and torch.equal(fast_codes, plain_codes), (name, window)
    kw = dict(negative_prompts=n, guidance=Guidance(cfg_scale=2.0), sampling=GREEDY)
    tokens, codes = generate_image(model, layout, p, 3, 4, **kw)
    for r in (1, 2):
        stream = list(generate_image_stream(model, layout, p, 3, 4, keep=codes[:, :r], loop=jacobi(4), **kw))
        assert [rows.rows_done for rows in stream] == list(range(r + 1, 4))   # only the drawn rows are reported
        assert torch.equal(stream[-1].tokens, tokens) and torch.equal(stream[-1].codes, codes)
