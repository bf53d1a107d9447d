"""The GPT: parity with transformers' Emu3 decoder, KV-cache decoding equals full recompute (single prompts,
left-padded batches, the CFG doubled batch), manual attention equals SDPA, and the full-size preset's size."""

import pytest
import torch

from nano_emu.gpt import GPT, GPTConfig, HeadLayerNorm

TINY = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, dim=64, intermediate_size=96, rope_theta=1e6,
            max_seq_len=128)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_matches_transformers_emu3_decoder():
    transformers = pytest.importorskip("transformers")
    config = transformers.Emu3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.Emu3ForCausalLM(config).eval()
    with torch.no_grad():   # the default init has unit norms; perturb them so the test sees their loading
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = GPT(GPTConfig(**TINY)).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in ref.state_dict().items()}, strict=True)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        ours.config.sdpa = False
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_manual_attention_equals_sdpa(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head)
    ids = torch.randint(0, 300, (3, 25))
    mask = torch.ones(3, 25, dtype=torch.long)
    mask[1, :7] = 0
    mask[2, :20] = 0
    with torch.no_grad():
        fast = [model(ids), model(ids, attention_mask=mask)]
        model.config.sdpa = False
        slow = [model(ids), model(ids, attention_mask=mask)]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def decode_all(model, prompts_ids, mask, continuation):
    """Prefill the prompts, then feed `continuation` (B, N) one token at a time; returns the N+1 next-token
    logits rows (B, N+1, V) produced with the cache."""
    B, L = prompts_ids.shape
    cache = model.new_cache(B, L + continuation.size(1))
    cache.start(mask)
    out = [model(prompts_ids, cache=cache, input_pos=torch.arange(L))[:, -1]]
    for i in range(continuation.size(1)):
        out.append(model(continuation[:, i:i + 1], cache=cache, input_pos=torch.tensor([L + i]))[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("sdpa", [True, False])
def test_kv_cache_decode_equals_full_recompute(sdpa):
    model = tiny_gpt(sdpa=sdpa)
    prompt, continuation = torch.randint(0, 300, (1, 11)), torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        cached = decode_all(model, prompt, None, continuation)
        full = model(torch.cat([prompt, continuation], dim=1))[:, prompt.size(1) - 1:]
    assert cached.shape == full.shape == (1, 31, 300)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone():
    """Prompts of different lengths, left-padded into one batch (as CFG's [cond; uncond] is), then decoded with
    the cache: every row gives the logits it gives when run alone without padding or cache."""
    model = tiny_gpt()
    lengths = [13, 5, 9, 1]
    prompts = [torch.randint(0, 300, (n,)) for n in lengths]
    continuation = torch.randint(0, 300, (len(lengths), 12))
    L = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(L - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    with torch.no_grad():
        cached = decode_all(model, ids, mask, continuation)
        full_padded = model(torch.cat([ids, continuation], 1), attention_mask=torch.cat(
            [mask, torch.ones_like(continuation)], 1))[:, L - 1:]
        for row, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[row]])[None])[0, len(p) - 1:]
            torch.testing.assert_close(cached[row], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full_padded[row], alone, atol=1e-5, rtol=1e-5)


def test_cfg_doubled_batch_shares_tokens_and_matches_recompute():
    """The CFG batch [cond; uncond]: both halves are fed the same sampled tokens after prompts of different
    lengths; each half's cached logits equal a full recompute of that half alone."""
    model = tiny_gpt()
    cond, uncond = torch.randint(0, 300, (17,)), torch.randint(0, 300, (4,))
    shared = torch.randint(0, 300, (20,))
    ids = torch.stack([cond, torch.cat([torch.zeros(13, dtype=torch.long), uncond])])
    mask = torch.stack([torch.ones(17), torch.cat([torch.zeros(13), torch.ones(4)])]).long()
    with torch.no_grad():
        cached = decode_all(model, ids, mask, shared.expand(2, -1))
        for row, prompt in enumerate([cond, uncond]):
            alone = model(torch.cat([prompt, shared])[None])[0, len(prompt) - 1:]
            torch.testing.assert_close(cached[row], alone, atol=1e-5, rtol=1e-5)


def test_emu3_8b_parameter_count_matches_released_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.Emu3TextConfig(   # the released Emu3-Gen config.json values
        vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=9216, rms_norm_eps=1e-5,
        rope_theta=1e6, tie_word_embeddings=False)
    with torch.device("meta"):
        released = sum(p.numel() for p in transformers.Emu3ForCausalLM(config).parameters())
        ours = GPT(GPTConfig.emu3_8b()).num_params()
    assert ours == released
    assert 8.4e9 < ours < 8.6e9   # "8B": 8.49B with the untied 184622-row head


def test_clear_errors():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="cache.start"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=model.new_cache(1, 8), input_pos=torch.tensor([0]),
              attention_mask=torch.ones(1, 1))
    with pytest.raises(ValueError, match="context"):
        model.new_cache(1, 1000)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}], ids=["plain", "qk_norm"])
def test_attention_maps_are_the_weights_the_forward_uses(overrides, monkeypatch):
    """evaluate.attention_maps (notebooks 04 and 06) recomputes each layer's weights outside the forward; they must
    be the softmax the readable attention path takes, heads averaged."""
    import torch.nn.functional as F
    from nano_emu import evaluate as ev
    model = tiny_gpt(**overrides, sdpa=False)
    with torch.no_grad():   # a qk-norm left at weight 1 / bias 0 would hide a missing norm less well
        for module in model.modules():
            if isinstance(module, HeadLayerNorm):
                module.weight.normal_(1.0, 0.3), module.bias.normal_(0.0, 0.3)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    seen, softmax = [], F.softmax
    monkeypatch.setattr(F, "softmax", lambda x, dim: seen.append(softmax(x, dim=dim)) or seen[-1])
    model(ids)
    monkeypatch.setattr(F, "softmax", softmax)
    maps = ev.attention_maps(model, ids)
    assert len(maps) == len(seen) == model.config.n_layer
    for mine, used in zip(maps, seen):
        torch.testing.assert_close(mine, used[0].mean(0))
        assert torch.allclose(mine.sum(-1), torch.ones(12)) and mine.triu(1).abs().max() == 0
