"""Fast sampling: the decoder owns its KV cache, the image loop does no per-token host work, --compile gives the
same tokens."""

import pytest
import torch

from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.sampler import Decoder, generate_image, generate_image_stream
from nano_emu.tokenizer import ByteTokenizer

tok = ByteTokenizer()
L = Layout.tiny(codebook_size=64)


def tiny_gpt(layout=L, seed=0, scale=100.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(layout.vocab_size, n_layer=2, dim=64, n_head=4, n_kv_head=2, intermediate_size=128,
                               max_seq_len=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)   # peaked, prompt-dependent logits, like a trained model's
    return model


def prompts(*captions, h=3, w=4, frames=None, layout=L):
    return [layout.generation_prompt(c, h, w, tok, frames) for c in captions]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP threads waiting on each other on a busy 2-core machine
    can make a test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the decode loop


def test_decoder_owns_one_cache_reused_across_calls_and_released():
    model = tiny_gpt()
    decoder = Decoder(model)
    p, n = prompts("a red circle", "b"), prompts("", "")
    first, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, temperature=0, decoder=decoder)
    cache = decoder.cache
    assert cache.batch_size == 4 and cache.max_len == 128 >= len(p[0]) + len(L.grid_schedule(3, 4))
    again, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, temperature=0, decoder=decoder)
    smaller, _ = generate_image(model, L, p, 2, 3, negative_prompts=prompts("", "", h=2, w=3), temperature=0,
                                decoder=decoder)
    assert decoder.cache is cache                      # same rows, no more tokens: the same buffers
    fresh_smaller, _ = generate_image(model, L, p, 2, 3, negative_prompts=prompts("", "", h=2, w=3), temperature=0)
    assert torch.equal(first, again) and torch.equal(smaller, fresh_smaller)   # stale slots never leak in
    longer = prompts("a much longer caption " * 4)
    generate_image(model, L, longer, 3, 4, negative_prompts=n[:1], temperature=0, decoder=decoder)
    assert decoder.cache is not cache and decoder.cache.batch_size == 2        # other rows: a new cache
    cache = decoder.cache
    generate_image(model, L, longer, 6, 7, negative_prompts=n[:1], temperature=0, decoder=decoder)
    assert decoder.cache is not cache and decoder.cache.max_len == 256         # more tokens: a longer one
    decoder.release()
    assert decoder.cache is None
    # the model keeps no decoding state of its own
    assert not any(torch.is_tensor(v) for m in model.modules() for k, v in vars(m).items() if not k.startswith("_"))
    assert {n for n, _ in model.named_buffers()} == set()


def test_image_loop_does_no_host_work_per_token(monkeypatch):
    """No torch.tensor(...) and no .item()/bool()/tolist() sync inside the image loop: the count of such calls
    is the same for 12 and for 48 generated codes."""
    calls = {"n": 0}

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counting(torch.tensor))
    model = tiny_gpt()
    counts = []
    for h, w in ((3, 4), (6, 8)):
        calls["n"] = 0
        for rows in generate_image_stream(model, L, prompts("x", h=h, w=w), h, w, negative_prompts=prompts(
                "", h=h, w=w), generator=torch.Generator().manual_seed(0)):
            pass
        counts.append(calls["n"])
    assert counts[0] == counts[1], counts


def test_compiled_decode_step_gives_the_same_tokens():
    """--compile only changes speed: torch.compile of the decode step gives the greedy tokens of the eager step.
    On the CPU this is inductor writing and building C++ kernels: ~10-30 s, most of this file's time."""
    pytest.importorskip("torch._inductor")
    model = tiny_gpt()
    p, n = prompts("a red circle", "b", frames=2), prompts("", "", frames=2)
    kw = dict(frames=2, negative_prompts=n, cfg_scale=3.0, temperature=0)
    eager, _ = generate_image(model, L, p, 3, 4, **kw)
    compiled = Decoder(model, compile=True)
    assert torch.equal(generate_image(model, L, p, 3, 4, decoder=compiled, **kw)[0], eager)
