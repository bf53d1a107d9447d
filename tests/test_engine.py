"""The engine and the image loop's speed: the engine owns its KV cache (reused across calls, freed on release),
the image loop does no per-token host work, and --compile gives the same tokens. SJD's correctness lives in
tests/test_sjd.py."""

from functools import partial

import pytest
import torch

import sample
from nano_emu import engine as engine_module
from nano_emu.engine import Engine
from nano_emu.gpt import GPT, GPTConfig, KVCache
from nano_emu.layout import Layout
from nano_emu.pipeline import Pipeline
from nano_emu.sampler import GREEDY, Guidance, generate_image, generate_image_stream
from nano_emu.sjd import jacobi_decode
from nano_emu.tokenizer import ByteTokenizer
from nano_emu.vq import VQConfig, VQModel

tok = ByteTokenizer()
L = Layout.tiny(codebook_size=64)
CFG3 = Guidance(cfg_scale=3.0)


def jacobi(window):
    return partial(jacobi_decode, window=window)


def tiny_gpt(layout=L, seed=0, scale=100.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(layout.vocab_size, n_layer=2, dim=64, n_head=4, n_kv_head=2, intermediate_size=128,
                               max_seq_len=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)   # peaked, prompt-dependent logits, like a trained model's
    return model


def prompts(*captions, h=3, w=4, t=1, layout=L):
    return [layout.generation_prompt(c, h, w, tok, t) for c in captions]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP threads waiting on each other on a busy 2-core machine
    can make a test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the decode loop


def test_engine_owns_one_cache_reused_across_calls_and_released():
    model = tiny_gpt()
    engine = Engine(model)
    p, n = prompts("a red circle", "b"), prompts("", "")
    kw = dict(guidance=CFG3, sampling=GREEDY)
    first, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, engine=engine, **kw)
    cache = engine.cache
    assert cache.batch_size == 4 and cache.max_len == 128 >= len(p[0]) + len(L.grid_schedule(3, 4))
    again, _ = generate_image(model, L, p, 3, 4, negative_prompts=n, engine=engine, **kw)
    smaller, _ = generate_image(model, L, p, 2, 3, negative_prompts=prompts("", "", h=2, w=3), engine=engine, **kw)
    assert engine.cache is cache                      # same rows, no more tokens: the same buffers
    fresh_smaller, _ = generate_image(model, L, p, 2, 3, negative_prompts=prompts("", "", h=2, w=3), **kw)
    assert torch.equal(first, again) and torch.equal(smaller, fresh_smaller)   # stale slots never leak in
    longer = prompts("a much longer caption " * 4)
    generate_image(model, L, longer, 3, 4, negative_prompts=n[:1], engine=engine, **kw)
    assert engine.cache is not cache and engine.cache.batch_size == 2        # other rows: a new cache
    cache = engine.cache
    generate_image(model, L, longer, 6, 7, negative_prompts=n[:1], engine=engine, **kw)
    assert engine.cache is not cache and engine.cache.max_len == 256         # more tokens: a longer one
    engine.release()
    assert engine.cache is None
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
                "", h=h, w=w), guidance=CFG3, generator=torch.Generator().manual_seed(0)):
            pass
        counts.append(calls["n"])
    assert counts[0] == counts[1], counts


def test_compiled_decode_step_gives_the_same_tokens():
    """--compile only changes speed: torch.compile of the plain and of the SJD decode step gives the greedy tokens
    of the eager step. On the CPU this is inductor writing and building C++ kernels: ~10-30 s, most of this
    file's time."""
    pytest.importorskip("torch._inductor")
    model = tiny_gpt()
    p, n = prompts("a red circle", "b", t=2), prompts("", "", t=2)
    kw = dict(t=2, negative_prompts=n, guidance=CFG3, sampling=GREEDY)
    eager, _ = generate_image(model, L, p, 3, 4, **kw)
    compiled = Engine(model, compile=True)
    assert torch.equal(generate_image(model, L, p, 3, 4, engine=compiled, **kw)[0], eager)
    assert torch.equal(generate_image(model, L, p, 3, 4, engine=compiled, loop=jacobi(6), **kw)[0], eager)


# ------------------------------------------------------------------------------------ user-facing options


def test_pipeline_and_sample_py_options(tmp_path):
    model = tiny_gpt(Layout.tiny(codebook_size=512))
    vq = VQModel(VQConfig.tiny()).eval()
    pipe = Pipeline(model, vq, tok, Layout.tiny(codebook_size=512), image_area=64 * 64)
    plain = pipe.draw_stream(["a red circle"], cfg_scale=3.0, temperature=0)
    *_, plain = plain
    pipe.sjd = 8
    *_, fast = pipe.draw_stream(["a red circle"], cfg_scale=3.0, temperature=0)
    assert torch.equal(plain.tokens, fast.tokens)
    assert pipe.engine.cache is not None
    pipe.release()
    assert pipe.engine.cache is None
    ckpt = str(tmp_path)   # sample.py checks the folder exists; its files are read only later
    args = sample.parse_args(["--ckpt", ckpt, "--prompt", "y", "--sjd", "--compile"])
    assert args.sjd == 16 and args.compile
    draw = ["--ckpt", ckpt, "--prompt", "y"]
    assert sample.parse_args([*draw, "--sjd", "4"]).sjd == 4 and sample.parse_args(draw).sjd == 0
    with pytest.raises(SystemExit) as refused:   # a window of 1 verifies nothing: refused in one line, exit 2
        sample.parse_args([*draw, "--sjd", "1"])
    assert refused.value.code == 2


def test_the_cache_estimate_is_what_the_cache_allocates():
    config = GPTConfig.tiny(300, dim=64, n_layer=2, n_head=4, n_kv_head=2)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(config, 3, 40, dtype=dtype)
        tensors = (cache.k, cache.v, cache.slots, cache.is_token, cache.cos, cache.sin)
        assert KVCache.nbytes(config, 3, 40, dtype) == sum(t.numel() * t.element_size() for t in tensors)


def test_a_cache_bigger_than_free_memory_is_refused_before_it_is_allocated(monkeypatch):
    model = GPT(GPTConfig.tiny(300, dim=64, n_layer=2, n_head=4, n_kv_head=2)).eval()
    free = engine_module.free_memory(torch.device("cpu"))
    assert free is None or 0 < free < 2**50   # what the system says, e.g. Linux's MemAvailable
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 2**20)   # 1 MiB free
    engine = Engine(model)
    engine.prefill([[1, 2, 3]], 0, 10)   # a cache of 128 slots for one row: 82 kB
    with pytest.raises(ValueError, match=r"a KV cache for 100 rows of 128 tokens .* needs 7.8 MiB, more than the "
                                         r"1.0 MiB free on cpu"):
        engine.prefill([[1, 2, 3]] * 100, 0, 10)   # 8 MB
    assert engine.cache is None   # the old one was freed, no new one was made
