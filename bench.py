"""Decode benchmark: what the static KV cache buys.

Draws images with a tiny GPT (random weights: speed does not depend on them) with CFG (doubled batch) and grid
constraints, at a grid of n tokens and at 2n tokens, and compares against a peer run in the same process that
recomputes the whole sequence every step (no cache). Reports tokens/s and ms per step; with the cache the cost
per token should stay flat as the sequence doubles, without it it grows with the length.

    python bench.py                       # CPU, the tiny preset
    python bench.py --device cuda --dim 1024 --layers 16 --dtype bfloat16
    python bench.py --llamagen GPT-B      # s per 256x256 image: LlamaGen GPT-B + VQ-16, random weights, with CFG
    python bench.py --chameleon-layers 2  # s per 512x512 Anole-shaped image: 7B width and vocabulary, 2 of 32 layers
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.sampler import GridConstraint, cfg_mix, generate_image, sample
from nano_emu.tokenizer import ByteTokenizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate_without_cache(model, layout, prompt, negative, h, w, cfg_scale, generator):
    """The peer: the same CFG + constraint + sampling, but every step re-runs the whole sequence."""
    constraint = GridConstraint(layout, h, w, vocab_size=model.config.vocab_size, device=model.lm_head.weight.device)
    seqs = [list(prompt), list(negative)]
    for step in range(len(constraint)):
        logits = [model(torch.tensor([s], device=model.lm_head.weight.device))[0, -1] for s in seqs]
        logprobs = cfg_mix(F.log_softmax(logits[0], -1), F.log_softmax(logits[1], -1), cfg_scale)
        token = int(sample(constraint(logprobs[None], step), generator)[0])
        seqs = [s + [token] for s in seqs]
    return seqs[0][len(prompt):]


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_llamagen(args):
    """Seconds per image for a released LlamaGen size with random weights (speed does not depend on them):
    the demo's sampling (CFG 4 on a doubled batch, top-k 2000) through the shared sampler, then VQ-16 decoding."""
    from nano_emu.llamagen import llamagen_pipeline
    from nano_emu.vq import VQConfig, VQModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.llamagen(args.llamagen, grid=args.image_size // 16)).to(device, dtype)
    pipe = llamagen_pipeline(gpt, VQModel(VQConfig.llamagen(16)).to(device))
    h, w = pipe.grid()
    print(f"LlamaGen {args.llamagen} ({gpt.num_params() / 1e6:.0f}M, {args.dtype}) + VQ-16 "
          f"({sum(p.numel() for p in pipe.vq.parameters()) / 1e6:.0f}M, float32) on {device}, "
          f"{torch.get_num_threads()} threads: {args.images} image(s) of {h}x{w} tokens, CFG {pipe.cfg_scale} "
          f"(batch {2 * args.images})")
    sync(device)
    start = time.perf_counter()
    for rows in pipe.draw_stream(["207"] * args.images, seed=0):
        pass
    sync(device)
    sampled = time.perf_counter() - start
    pipe.decode(rows.codes)
    sync(device)
    decoded = time.perf_counter() - start - sampled
    n = h * w
    print(f"GPT: {sampled:.1f}s for {n} steps ({1e3 * sampled / n:.0f} ms/step, {args.images * n / sampled:.1f} "
          f"image tokens/s); VQ decode: {decoded:.1f}s; {(sampled + decoded) / args.images:.1f} s per image")


@torch.no_grad()
def bench_chameleon(args):
    """Seconds per 512x512 image for an Anole-shaped model cut to --chameleon-layers layers (random weights): the
    7B's width, heads and 65536-token head, the CFG batch of 2 (3-way CFG on a text prompt is 2-way, chameleon.py),
    --steps decode steps timed through the sampler's decode_one and extrapolated to the 1025 of an image (the
    cache makes every step cost the same, bench.py's default mode shows it), plus the full VQGAN decoding 32x32."""
    from nano_emu.sampler import decode_one, prefill
    from nano_emu.vq import VQConfig, VQModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.chameleon("7B", n_layer=args.chameleon_layers)).to(device, dtype).eval()
    vq = VQModel(VQConfig.chameleon()).to(device).eval()
    print(f"Anole-shaped GPT, {args.chameleon_layers} of 32 layers ({gpt.num_params() / 1e9:.2f}B, {args.dtype}) + "
          f"VQGAN ({sum(p.numel() for p in vq.parameters()) / 1e6:.0f}M, float32) on {device}, "
          f"{torch.get_num_threads()} threads, CFG batch 2")
    prompt = [0] + list(range(100, 120)) + [8197]
    logits, length = prefill(gpt, [prompt, [0, 8197]], 1, 1025)
    token = logits.argmax(-1)
    decode_one(gpt, token, torch.tensor([length], device=device))   # warm-up
    sync(device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        decode_one(gpt, token, torch.tensor([length + step], device=device))
    sync(device)
    per_step = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    vq.decode(torch.randint(0, 8192, (1, 32, 32), device=device))
    sync(device)
    decoded = time.perf_counter() - start
    print(f"GPT: {1e3 * per_step:.0f} ms/step over {args.steps} steps -> {1025 * per_step:.0f}s for 1024 codes + EOI; "
          f"VQ decode 512x512: {decoded:.1f}s; {1025 * per_step + decoded:.0f} s per image")


def main(args):
    if args.chameleon_layers:
        return bench_chameleon(args)
    if args.llamagen:
        return bench_llamagen(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layout, tok = Layout.tiny(codebook_size=args.codebook), ByteTokenizer()
    torch.manual_seed(0)
    config = GPTConfig.tiny(layout.vocab_size, n_layer=args.layers, dim=args.dim, max_seq_len=4096)
    model = GPT(config).to(device, dtype).eval()
    print(f"model: {model.num_params() / 1e6:.2f}M params, {args.layers} layers, dim {args.dim}, {args.dtype}, "
          f"{device}, {torch.get_num_threads()} threads; CFG doubled batch (2 rows) + grid constraint")
    prompt = layout.generation_prompt("a red circle in the top left", args.h, args.w, tok)
    rows = []
    for w in (args.w, 2 * args.w):   # the same rows twice as long: 2x the tokens per image
        negative = layout.generation_prompt("", args.h, w, tok)
        prompt = layout.generation_prompt("a red circle in the top left", args.h, w, tok)
        n_tokens = len(layout.grid_schedule(args.h, w))
        gen = torch.Generator(device).manual_seed(0)
        cached = lambda: generate_image(model, layout, [prompt], args.h, w, negative_prompts=[negative],
                                        cfg_scale=3.0, generator=gen)
        cached()   # warm-up
        t_cache = timed(cached, device, args.repeats)
        t_full = float("nan")
        if not args.skip_peer:
            peer = lambda: generate_without_cache(model, layout, prompt, negative, args.h, w, 3.0, gen)
            t_full = timed(peer, device, max(1, args.repeats // 2))
        rows.append((n_tokens, len(prompt) + n_tokens, t_cache, t_full))

    print(f"\n{'tokens':>7} {'seq len':>8} | {'cache tok/s':>11} {'ms/token':>9} | {'recompute tok/s':>15} "
          f"{'ms/token':>9} | {'speed-up':>8}")
    for n, seq, t_cache, t_full in rows:
        print(f"{n:7d} {seq:8d} | {n / t_cache:11.1f} {1e3 * t_cache / n:9.3f} | {n / t_full:15.1f} "
              f"{1e3 * t_full / n:9.3f} | {t_full / t_cache:7.1f}x")
    (n1, _, c1, f1), (n2, _, c2, f2) = rows
    print(f"\ncost per token at 2x the sequence length, relative to 1x: with cache {(c2 / n2) / (c1 / n1):.2f}x, "
          f"recompute {(f2 / n2) / (f1 / n1):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=4, help="GPT layers (tiny preset: 4)")
    parser.add_argument("--dim", type=int, default=256, help="GPT width (tiny preset: 256)")
    parser.add_argument("--codebook", type=int, default=1024, help="VQ codebook size (visual vocabulary)")
    parser.add_argument("--h", type=int, default=16, help="grid rows")
    parser.add_argument("--w", type=int, default=16, help="grid columns at 1x (2x doubles them)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--skip-peer", action="store_true", help="skip the slow no-cache peer run")
    parser.add_argument("--llamagen", default=None, help="instead: s/image of a LlamaGen size (GPT-B, ...) + VQ-16, "
                        "random weights of the released shapes, the demo's sampling")
    parser.add_argument("--chameleon-layers", type=int, default=0, help="instead: s per 512x512 image of an "
                        "Anole-shaped GPT with this many layers (7B width and vocabulary) + Chameleon's VQGAN")
    parser.add_argument("--steps", type=int, default=16, help="with --chameleon-layers: decode steps timed")
    parser.add_argument("--image-size", type=int, default=256, help="with --llamagen: 256 or 384")
    parser.add_argument("--images", type=int, default=1, help="with --llamagen: images drawn as one batch")
    main(parser.parse_args())
