"""What bench.py measures on the released families' shapes with random weights: seconds per image, ms per step,
achieved bandwidth, peak memory.

Speed does not depend on the weights' values, so these measure a released model's cost without downloading it.
bench.py's `emu3`, `llamagen`, `chameleon` and `gpu` subcommands call these functions; `gpu` runs all of them and
writes one markdown table (docs/benchmarks.md has the command). Every function takes tiny=True: the same code path
at toy sizes, so a CPU run in seconds (tests/test_bench.py) proves the GPU command will get to its end.
"""

import time
from functools import partial

import torch

from .engine import Engine
from .gpt import GPT, GPTConfig
from .layout import Layout
from .sampler import Guidance, Sampling, generate_image, plain_decode
from .sjd import jacobi_decode


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> float:
    """GB allocated at most since the last reset_peak (nan off CUDA: the CPU allocator keeps no such count)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def random_model(config: GPTConfig, device, dtype) -> GPT:
    """A GPT with random weights made directly on the device in `dtype` (built on meta: never in fp32)."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


TINY = dict(n_layer=1, n_head=2, n_kv_head=2, dim=64, intermediate_size=128)   # the dry run's transformer


# ------------------------------------------------------------------------------------ Emu3-Gen


EMU3_VARIANTS = ("plain", "compiled", "sjd", "sjd-compiled")


def emu3(device, dtype, h: int = 90, w: int = 90, window: int = 16, top_k: int = 2048,
         variants=EMU3_VARIANTS, tiny: bool = False, peak_gbps: float = float("nan"), rows_to: list | None = None,
         on_row=None) -> list[dict]:
    """Emu3-Gen (GPTConfig.emu3_8b, VQConfig.emu3; 90x90 codes = 720x720 px) text -> PNG-ready image with CFG 3 and
    Emu3's top-k, per decoding variant: prefill s, decode ms per forward and per token, s per image, achieved GB/s
    (a decode step reads every weight but the embedding table and the whole static cache of both CFG rows) and
    peak memory of the whole path. Prints a row per variant as it finishes; returns them. With rows_to (a list of
    markdown lines, gpu_table's) each row is also appended there as a table line, then on_row() is called."""
    from .image import tensor_to_image
    from .vq import VQConfig, VQModel

    if tiny:   # a smoke test of this code path on any machine
        layout = Layout.tiny(codebook_size=512)
        config, vq_config = GPTConfig.tiny(layout.vocab_size, max_seq_len=4096, **TINY), VQConfig.tiny(codebook_size=512)
    else:
        config, vq_config, layout = GPTConfig.emu3_8b(), VQConfig.emu3(), Layout.emu3()
    gpt = random_model(config, device, dtype)
    vq = VQModel(vq_config).to(device).eval()   # the VQ runs in float32, as Emu3's demos do
    n_new = len(layout.grid_schedule(h, w))
    g = torch.Generator().manual_seed(0)
    prompt = [layout.bos] + torch.randint(0, 256, (40,), generator=g).tolist() + [layout.boi, layout.img]
    negative = [layout.bos] + torch.randint(0, 256, (60,), generator=g).tolist() + [layout.boi, layout.img]
    weight_bytes = sum(p.numel() * p.element_size() for n, p in gpt.named_parameters() if n != "embed_tokens.weight")
    kv_bytes = (2 * config.n_layer * 2 * config.n_kv_head * (len(negative) + n_new) * config.head_dim
                * gpt.lm_head.weight.element_size())
    name_of_card = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"{'tiny' if tiny else 'emu3_8b'}: {gpt.num_params() / 1e9:.2f}B params, {dtype}, {device}{name_of_card}; "
          f"{h}x{w} image = {n_new} tokens, CFG 3 (2 rows), top-k {top_k}; bytes per decode step: weights "
          f"{weight_bytes / 1e9:.2f} GB + full KV cache {kv_bytes / 1e9:.2f} GB")
    print("| decoding | prefill (s) | forwards | decode ms/forward | ms/token | s/image | GB/s | VQ decode (s) | "
          "peak memory (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in variants:
        compile_, sjd = name.endswith("compiled"), window if name.startswith("sjd") else 0
        decoder = Engine(gpt, compile=compile_)
        kw = dict(negative_prompts=[negative], guidance=Guidance(cfg_scale=3.0), sampling=Sampling(top_k=top_k),
                  engine=decoder, loop=partial(jacobi_decode, window=sjd) if sjd else plain_decode,
                  generator=torch.Generator(device).manual_seed(0))
        if compile_:   # compile (and record CUDA graphs) outside the timed run
            generate_image(gpt, layout, [prompt], h, w, **kw)
        sync(device)
        start = time.perf_counter()
        decoder.prefill([prompt, negative], layout.pad, n_new)
        sync(device)
        prefill = time.perf_counter() - start
        reset_peak(device)
        before = decoder.forwards
        sync(device)
        start = time.perf_counter()
        _, codes = generate_image(gpt, layout, [prompt], h, w, **kw)
        sync(device)
        generate = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            pixels = vq.decode(codes.to(device))
        tensor_to_image(pixels[0].float())   # the PNG-ready image: the whole text -> image path
        sync(device)
        vq_seconds = time.perf_counter() - start
        forwards = decoder.forwards - before - 1
        step = (generate - prefill) / forwards
        row = dict(name=name, prefill=prefill, forwards=forwards, ms_forward=1e3 * step,
                   ms_token=1e3 * (generate - prefill) / n_new, s_image=generate + vq_seconds,
                   gbps=(weight_bytes + kv_bytes) / step / 1e9, vq=vq_seconds, peak=peak_memory(device))
        rows.append(row)
        print(f"| {name} | {prefill:.3f} | {forwards} | {row['ms_forward']:.2f} | {row['ms_token']:.2f} | "
              f"{row['s_image']:.1f} | {row['gbps']:.0f} | {vq_seconds:.2f} | {row['peak']:.1f} |", flush=True)
        if rows_to is not None:
            rows_to.append(f"| Emu3-Gen {h}x{w} CFG 3 | {name} | {prefill:.3f} | {forwards} | {row['ms_forward']:.2f} "
                           f"| {row['s_image']:.1f} | {row['gbps']:.0f} | {100 * row['gbps'] / peak_gbps:.0f}% | "
                           f"{row['peak']:.1f} |")
            on_row and on_row()
        decoder.release()
    return rows


# ------------------------------------------------------------------------------------ LlamaGen, Chameleon


@torch.no_grad()
def llamagen(device, dtype, size: str = "GPT-B", image_size: int = 256, images: int = 1, compile: bool = False,
             tiny: bool = False) -> dict:
    """Seconds per image for a released LlamaGen size with random weights: the demo's sampling (CFG 4 on a doubled
    batch, top-k 2000) through the shared sampler, then VQ-16 decoding."""
    from .llamagen import llamagen_pipeline
    from .vq import VQConfig, VQModel

    torch.manual_seed(0)
    if tiny:
        config = GPTConfig.llamagen(size, grid=4, **TINY)
        vq = VQModel(VQConfig.tiny(codebook_size=16384, temporal_factor=1))
    else:
        config, vq = GPTConfig.llamagen(size, grid=image_size // 16), VQModel(VQConfig.llamagen(16))
    gpt = random_model(config, device, dtype)   # made on the device: no fp32 copy on the host first
    pipe = llamagen_pipeline(gpt, vq.to(device))
    pipe.compile = compile
    h, w = pipe.grid()
    print(f"LlamaGen {size}{' (tiny dims)' if tiny else ''} ({gpt.num_params() / 1e6:.0f}M, {dtype}) + VQ "
          f"({sum(p.numel() for p in pipe.vq.parameters()) / 1e6:.0f}M, float32) on {device}, "
          f"{torch.get_num_threads()} threads: {images} image(s) of {h}x{w} tokens, CFG {pipe.guidance.cfg_scale} "
          f"(batch {2 * images})")
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    for rows in pipe.draw_stream(["207"] * images, seed=0):
        pass
    sync(device)
    sampled = time.perf_counter() - start
    pipe.decode(rows.codes)
    sync(device)
    decoded = time.perf_counter() - start - sampled
    n = h * w
    row = dict(steps=n, ms_step=1e3 * sampled / n, gpt=sampled, vq=decoded, s_image=(sampled + decoded) / images,
               peak=peak_memory(device))
    print(f"GPT: {sampled:.1f}s for {n} steps ({row['ms_step']:.0f} ms/step, {images * n / sampled:.1f} image "
          f"tokens/s); VQ decode: {decoded:.1f}s; {row['s_image']:.1f} s per image")
    return row


@torch.no_grad()
def chameleon(device, dtype, layers: int = 32, steps: int = 16, compile: bool = False, tiny: bool = False) -> dict:
    """Seconds per 512x512 image for an Anole-shaped model of `layers` of its 32 layers (random weights): the 7B's
    width, heads and 65536-token head, the CFG batch of 2 (3-way CFG on a text prompt is 2-way, chameleon.py),
    `steps` decode steps timed through the Engine and extrapolated to the 1025 of an image (the cache makes every
    step cost about the same, bench.py's cache subcommand shows it), plus the full VQGAN decoding 32x32."""
    from .vq import VQConfig, VQModel

    torch.manual_seed(0)
    if tiny:
        config = GPTConfig.chameleon("7B", **TINY)
        vq, side = VQModel(VQConfig.tiny(codebook_size=8192, temporal_factor=1)), 4
    else:
        config, vq, side = GPTConfig.chameleon("7B", n_layer=layers), VQModel(VQConfig.chameleon()), 32
    gpt = random_model(config, device, dtype)   # a 7B never exists in fp32 on the host
    vq = vq.to(device).eval()
    print(f"Anole-shaped GPT, {config.n_layer} of 32 layers{' (tiny dims)' if tiny else ''} "
          f"({gpt.num_params() / 1e9:.2f}B, {dtype}) + VQGAN ({sum(p.numel() for p in vq.parameters()) / 1e6:.0f}M, "
          f"float32) on {device}, {torch.get_num_threads()} threads, CFG batch 2")
    reset_peak(device)
    prompt = [0] + list(range(100, 120)) + [8197]
    decoder = Engine(gpt, compile=compile)
    logits, length = decoder.prefill([prompt, [0, 8197]], 1, 1025)
    token = logits.argmax(-1)[:, None]                                          # (2, 1)
    input_pos = torch.tensor([length], device=device)
    decoder.step(token, input_pos)   # warm-up (and the compile, with compile=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        input_pos += 1
        decoder.step(token, input_pos)
    sync(device)
    per_step = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    vq.decode(torch.randint(0, 8192, (1, side, side), device=device))
    sync(device)
    decoded = time.perf_counter() - start
    row = dict(ms_step=1e3 * per_step, vq=decoded, s_image=1025 * per_step + decoded, peak=peak_memory(device))
    print(f"GPT: {row['ms_step']:.0f} ms/step over {steps} steps -> {1025 * per_step:.0f}s for 1024 codes + EOI; "
          f"VQ decode {side}x{side} codes: {decoded:.1f}s; {row['s_image']:.0f} s per image")
    decoder.release()
    return row


# ------------------------------------------------------------------------------------ the whole table


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_table(device, dtype, peak_gbps: float, h: int = 90, w: int = 90, window: int = 16,
              tiny: bool = False, out: str | None = None) -> str:
    """Everything above in one run, as one markdown table: returned, and rewritten to `out` after every row, so a
    run cut short by a time limit still leaves the rows it finished."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (dry run: numbers mean nothing)"
    lines = [f"Measured on {card}, torch {torch.__version__}, {dtype}; random weights of the released shapes"
             f"{' (TINY dims: a dry run)' if tiny else ''}. GB/s: bytes a decode step reads / its time; "
             f"peak {peak_gbps:.0f} GB/s given by --peak-gbps.", "",
             "| model | decoding | prefill (s) | forwards | ms/step | s/image | GB/s | % of peak | peak memory (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def write():
        if out:
            with open(out, "w") as f:
                f.write("\n".join(lines) + "\n")

    write()
    emu3(device, dtype, h, w, window, variants=("plain", "compiled", "sjd"), tiny=tiny, peak_gbps=peak_gbps,
         rows_to=lines, on_row=write)
    free(device)
    r = llamagen(device, dtype, "GPT-XL", 256, compile=True, tiny=tiny)
    lines.append(f"| LlamaGen GPT-XL {'tiny' if tiny else '256px'} CFG 4 | compiled | | {r['steps']} | "
                 f"{r['ms_step']:.2f} | {r['s_image']:.1f} | | | {r['peak']:.1f} |")
    write()
    free(device)
    r = chameleon(device, dtype, 32, compile=True, tiny=tiny)
    lines.append(f"| Chameleon-7B 512px CFG (2 rows) | compiled, 1025 steps extrapolated | | 1025 | {r['ms_step']:.2f} "
                 f"| {r['s_image']:.1f} | | | {r['peak']:.1f} |")
    write()
    free(device)
    return "\n".join(lines) + "\n"
