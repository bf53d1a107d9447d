"""The CUDA-only paths at tiny size, for the first minutes on a GPU: `pytest -m cuda tests/test_cuda.py`. Skipped
without CUDA, so a CPU run stays green. bf16 end to end, the compiled step in mode "reduce-overhead" (CUDA graphs,
which reuse their output buffers), SDPA's fused kernels against the manual attention, greedy tokens on the GPU
equal to the CPU's, and the KV cache's memory given back after a draw."""

import pytest
import torch

from nano_emu.engine import Engine
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.image import tensor_to_image
from nano_emu.sampler import GREEDY, Sampling, generate_image
from nano_emu.vq import VQConfig, VQModel
from test_engine import CFG3, L, jacobi, prompts, tiny_gpt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
P, N = prompts("a red circle", "a blue square"), prompts("", "")
GREEDY_CFG = dict(negative_prompts=N, guidance=CFG3, sampling=GREEDY)


def test_bf16_end_to_end_text_to_pixels():
    model = tiny_gpt().to(CUDA, torch.bfloat16)
    vq = VQModel(VQConfig.tiny(codebook_size=64, temporal_factor=1)).to(CUDA).eval()
    tokens, codes = generate_image(model, L, P, 3, 4, negative_prompts=N, guidance=CFG3,
                                   sampling=Sampling(temperature=1.0, top_k=8),
                                   generator=torch.Generator(CUDA).manual_seed(0))
    assert tokens.device.type == "cuda" and codes.shape == (2, 3, 4) and int(codes.max()) < 64
    for row in tokens.tolist():
        L.read_grid(row, 3, 4)   # a valid grid (raises otherwise)
    with torch.no_grad():
        pixels = vq.decode(codes)
    assert torch.isfinite(pixels).all()
    tensor_to_image(pixels[0].float())


def test_greedy_tokens_on_cuda_equal_cpu_float32():
    cpu = tiny_gpt()
    expected, _ = generate_image(cpu, L, P, 3, 4, **GREEDY_CFG)
    got, _ = generate_image(tiny_gpt().to(CUDA), L, P, 3, 4, **GREEDY_CFG)
    assert torch.equal(got.cpu(), expected)
    sjd, _ = generate_image(tiny_gpt().to(CUDA), L, P, 3, 4, loop=jacobi(5), **GREEDY_CFG)
    assert torch.equal(sjd.cpu(), expected)


def test_compiled_reduce_overhead_gives_the_eager_tokens_twice():
    """CUDA graphs replay into the same output buffers: a step whose logits were read after the next replay would
    give other tokens, and the second draw replays graphs recorded by the first."""
    model = tiny_gpt().to(CUDA)
    eager, _ = generate_image(model, L, P, 3, 4, **GREEDY_CFG)
    engine = Engine(model, compile=True)
    assert engine._step is not None and engine.compile
    for _ in range(2):
        assert torch.equal(generate_image(model, L, P, 3, 4, engine=engine, **GREEDY_CFG)[0], eager)
    assert torch.equal(generate_image(model, L, P, 3, 4, engine=engine, loop=jacobi(6), **GREEDY_CFG)[0], eager)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_sdpa_agrees_with_the_manual_attention(dtype, tol):
    torch.manual_seed(0)
    config = GPTConfig.tiny(L.vocab_size, n_layer=2, dim=128, n_head=4, n_kv_head=2, intermediate_size=256)
    fused = GPT(config).to(CUDA, dtype).eval()
    manual = GPT(GPTConfig.tiny(L.vocab_size, n_layer=2, dim=128, n_head=4, n_kv_head=2, intermediate_size=256,
                                sdpa=False)).to(CUDA, dtype).eval()
    manual.load_state_dict(fused.state_dict())
    ids = torch.randint(0, L.vocab_size, (2, 40), device=CUDA)
    with torch.no_grad():
        a, b = fused(ids, every_position=True).float(), manual(ids, every_position=True).float()
    assert (a - b).abs().max() <= tol * b.abs().max()


def test_memory_is_given_back_after_a_draw():
    model = tiny_gpt().to(CUDA)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    engine = Engine(model)
    generate_image(model, L, P, 3, 4, engine=engine, **GREEDY_CFG)
    cache = model.cache_nbytes(4, engine.cache.max_len)
    assert torch.cuda.max_memory_allocated(CUDA) >= start + cache   # the cache was there ...
    engine.release()
    generate_image(model, L, P, 3, 4, **GREEDY_CFG)                   # ... and an Engine made for one call
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(CUDA) == start                # ... is gone with it
