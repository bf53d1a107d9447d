"""The sampler: grid constraints make invalid structure impossible, CFG as one doubled batch equals Emu3's
two-branch guidance, cfg 1 is unguided sampling token for token, seeds reproduce, streaming yields rows."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import VISUAL, Layout, LayoutError
from nano_emu.sampler import (GREEDY, GridConstraint, Guidance, Sampling, cfg_mix, generate_image,
                              generate_image_stream, generate_text, sample)
from nano_emu.tokenizer import ByteTokenizer

tok = ByteTokenizer()
L = Layout.tiny(codebook_size=64)
CFG3 = Guidance(cfg_scale=3.0)


class AdversarialLogits(nn.Module):
    """A stand-in model (nanochat's MockModel idea) whose logits are random and favour exactly the wrong
    things: structural markers and text get large logits, so unconstrained sampling breaks the grid."""

    def __init__(self, seed=0):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=L.vocab_size, max_seq_len=4096)
        self.lm_head = nn.Linear(1, 1)   # only its device is read
        self.rng = torch.Generator().manual_seed(seed)

    def new_cache(self, batch_size, max_len):
        return SimpleNamespace(batch_size=batch_size, max_len=max_len, start=lambda prompt_mask=None: None)

    def cache_nbytes(self, batch_size, max_len):
        return 0   # its cache holds nothing

    def forward(self, idx, cache=None, input_pos=None, every_position=False):
        logits = 4 * torch.randn(idx.size(0), idx.size(1) if every_position else 1, L.vocab_size,
                                 generator=self.rng)
        logits[..., :L.first_visual] += 6.0    # text and markers look very attractive
        return logits


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(L.vocab_size, n_layer=2, dim=64, n_head=4, n_kv_head=2, intermediate_size=128,
                               max_seq_len=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)   # peaked, prompt-dependent logits, like a trained model's
    return model


def prompts(*captions, h=3, w=4, t=1):
    return [L.generation_prompt(c, h, w, tok, t) for c in captions]


class Insists(AdversarialLogits):
    """A model that wants the same tokens at every step with nearly all its mass (logit +50): any of them the
    sampler lets through where it does not belong shows up in the output."""

    def __init__(self, favourites):
        super().__init__()
        self.favourites = favourites

    def forward(self, idx, cache=None, input_pos=None, every_position=False):
        logits = torch.randn(idx.size(0), idx.size(1) if every_position else 1, L.vocab_size, generator=self.rng)
        logits[..., self.favourites] += 50.0
        return logits


def grid_spec(h, w, t):
    """Emu3's image block after IMG, written out: rows of w codes + EOL, EOF after each frame, then EOI, EOS."""
    return (([VISUAL] * w + [L.eol]) * h + [L.eof]) * t + [L.eoi, L.eos]


FAVOURITES = {"EOL": [L.eol], "text": [ord("x"), L.bos, L.pad], "end early": [L.eoi, L.eos, L.eof],
              "never a marker": list(range(L.first_visual, L.first_visual + 8))}


@pytest.mark.parametrize("favourite", FAVOURITES)
@pytest.mark.parametrize("t", [1, 3])
def test_constraints_make_a_malformed_grid_impossible(favourite, t):
    """Whatever the model insists on, every structural slot holds its marker and every other slot a visual token,
    under CFG and every sampling filter. Checked on the stream, whose codes Pipeline.draw decodes without any
    parsing (Layout.read_grid is not on that path)."""
    h, w, batch, spec = 3, 4, 2, grid_spec(3, 4, t)
    visual_slots = [offset for offset, kind in enumerate(spec) if kind == VISUAL]
    gen = torch.Generator().manual_seed(0)
    for settings in (Sampling(temperature=1.0), GREEDY, Sampling(top_k=5), Sampling(top_p=0.9),
                     Sampling(temperature=2.0, top_k=3)):
        *_, last = generate_image_stream(Insists(FAVOURITES[favourite]), L, prompts(*["x"] * batch, t=t),
                                         h, w, t, negative_prompts=prompts(*[""] * batch, t=t),
                                         guidance=CFG3, sampling=settings, generator=gen)
        assert last.tokens.shape == (batch, len(spec))
        for offset, kind in enumerate(spec):
            column = last.tokens[:, offset]
            assert (L.is_visual(column) if kind == VISUAL else column == kind).all(), (settings, offset, column)
        codes = last.tokens[:, visual_slots] - L.first_visual    # (batch, t * h * w)
        assert torch.equal(last.codes.flatten(1), codes)
        if favourite == "never a marker":   # the mask takes away only what is invalid: inside a row, the model wins
            assert codes.max() < 8


def test_without_constraints_the_same_logits_break_the_grid():
    """The adversarial model really is adversarial: unconstrained, its grids do not parse."""
    with pytest.raises(LayoutError):
        generate_image(AdversarialLogits(), L, prompts("x"), 3, 4, constrain=False,
                       generator=torch.Generator().manual_seed(0))
    _, codes = generate_image(AdversarialLogits(), L, prompts("x"), 3, 4, constrain=False,
                              repair=True, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, 3, 4)


@pytest.mark.parametrize("layout", [L, Layout.chameleon(eoi=36, boi=37, codebook_size=32, image_grid=(2, 3)),
                                    Layout.llamagen(codebook_size=32)], ids=["emu3", "chameleon", "llamagen"])
def test_grid_constraint_allows_exactly_what_the_schedule_says(layout):
    """At every offset after IMG the constraint leaves exactly the schedule's tokens: every code inside a row,
    the one marker where a marker must stand; for a single step and for a speculative window alike."""
    h, w, t, vocab = 2, 3, 1, max(layout.vocab_size, 64)   # Chameleon's markers lie past its codes
    constraint = GridConstraint(layout, h, w, t, vocab_size=vocab)
    codes = set(range(layout.first_visual, layout.first_visual + layout.codebook_size))
    schedule = layout.grid_schedule(h, w, t)
    window = torch.isfinite(constraint.window(torch.zeros(1, len(schedule), vocab), 0))[0]
    for step, kind in enumerate(schedule):
        allowed = set(torch.isfinite(constraint(torch.zeros(1, vocab), step)).nonzero()[:, 1].tolist())
        assert allowed == (codes if kind == VISUAL else {kind}), (step, kind)
        assert set(window[step].nonzero()[:, 0].tolist()) == allowed


def test_cfg_scale_1_is_unguided_sampling_token_for_token():
    model = tiny_gpt()
    p, n = prompts("a red circle", "a blue square"), prompts("", "")
    unguided, _ = generate_image(model, L, p, 3, 4, generator=torch.Generator().manual_seed(7))
    scale_one, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, guidance=Guidance(cfg_scale=1.0),
                                  generator=torch.Generator().manual_seed(7))
    assert torch.equal(unguided, scale_one)
    guided, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, guidance=CFG3,
                               generator=torch.Generator().manual_seed(7))
    assert not torch.equal(unguided, guided)


def test_batched_cfg_equals_two_branch_guidance():
    """Emu3's released CFG runs the conditional and unconditional prompts as two separate models/contexts.
    Recompute that here from scratch (no cache, no padding, one branch at a time) with greedy decoding and
    check the doubled-batch sampler picks the same tokens."""
    model = tiny_gpt(seed=1)
    cond, uncond = prompts("a green triangle in the top left")[0], prompts("")[0]   # different lengths
    scale = 2.5
    tokens, _ = generate_image(model, L, [cond], 3, 4, negative_prompts=[uncond], guidance=Guidance(cfg_scale=scale),
                               sampling=GREEDY)
    constraint = GridConstraint(L, 3, 4)
    expected = []
    with torch.no_grad():
        for step in range(len(constraint)):
            c = torch.log_softmax(model(torch.tensor([cond + expected]))[0, -1], -1)
            u = torch.log_softmax(model(torch.tensor([uncond + expected]))[0, -1], -1)
            expected.append(int(constraint(cfg_mix(c, u, scale)[None], step).argmax()))
    assert tokens[0].tolist() == expected


def test_seed_reproduces_and_differs():
    model = tiny_gpt()
    p, n = prompts("a", "b"), prompts("", "")
    run = lambda seed: generate_image(model, L, p, 3, 4, negative_prompts=n, guidance=CFG3,
                                      generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_sample_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, gen, temperature=0), greedy)
    assert torch.equal(sample(logits, gen, top_k=1), greedy)
    assert torch.equal(sample(logits, gen, top_p=1e-6), greedy)
    masked = logits.clone()
    masked[:, 10:] = float("-inf")
    for _ in range(20):
        assert sample(masked, gen, temperature=2.0).max() < 10
    top3 = logits.topk(3, -1).indices
    draws = torch.stack([sample(logits, gen, top_k=3) for _ in range(30)], 1)
    assert all(set(d.tolist()) <= set(t.tolist()) for d, t in zip(draws, top3))
    # top-p keeps the smallest set whose mass reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {int(sample(probs, gen, top_p=0.75)) for _ in range(200)}
    assert kept == {0, 1}


def test_streaming_yields_every_row_in_order():
    model = tiny_gpt()
    stream = list(generate_image_stream(model, L, prompts("a", "b", t=2), 3, 4, 2, negative_prompts=prompts(
        "", "", t=2), guidance=CFG3, generator=torch.Generator().manual_seed(3)))
    assert [r.rows_done for r in stream] == list(range(1, 7))
    for earlier, later in zip(stream, stream[1:]):
        assert torch.equal(later.codes[:, :earlier.rows_done], earlier.codes)
    tokens, codes = generate_image(model, L, prompts("a", "b", t=2), 3, 4, 2, negative_prompts=prompts("", "", t=2),
                                   guidance=CFG3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(stream[-1].tokens, tokens)
    assert torch.equal(stream[-1].codes.view(2, 2, 3, 4), codes)


def test_generate_text_stops_at_eos():
    class Scripted(AdversarialLogits):
        script = [ord("h"), ord("i"), L.eos, ord("x")]

        def new_cache(self, batch_size, max_len):
            self.step = 0
            return super().new_cache(batch_size, max_len)

        def forward(self, idx, cache=None, input_pos=None, every_position=False):
            logits = torch.zeros(idx.size(0), 1, L.vocab_size)
            logits[..., self.script[min(self.step, 3)]] = 1.0
            self.step += 1
            return logits

    out = generate_text(Scripted(), L, [[L.bos, 1, 2]], max_new_tokens=10)
    assert out == [[ord("h"), ord("i")]] and tok.decode(out[0]) == "hi"


def test_prompt_too_long_for_the_context():
    model = tiny_gpt()   # context 256
    long_prompt = [L.generation_prompt("x" * 250, 3, 4, tok)]
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate_image(model, L, long_prompt, 3, 4)
    with pytest.raises(ValueError, match="negative"):
        generate_image(model, L, prompts("x"), 3, 4, guidance=CFG3)
