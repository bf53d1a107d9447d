"""Decode benchmarks, each in one process so every figure is a ratio against a peer measured beside it.

    python bench.py                          # cache: cached decode vs no-cache recompute, at n and 2n tokens
    python bench.py transformers             # against transformers' generate() on the same weights (CPU)
    python bench.py sjd --ckpt out/tiny      # speculative Jacobi decoding on a trained tiny model: forwards,
                                             #   wall time and drawing adherence, with and without SJD
    python bench.py emu3 --device cuda       # Emu3-8B shapes with random bf16 weights, a 90x90 image with CFG

    python bench.py --llamagen GPT-B         # s per 256x256 image: LlamaGen GPT-B + VQ-16, random weights, with CFG
    python bench.py --chameleon-layers 2     # s per 512x512 Anole-shaped image: 7B width and vocabulary, 2 of 32 layers

`cache`: a tiny random GPT draws an image with CFG (doubled batch) and the grid constraint; the peer recomputes
the whole sequence every step. With the cache the cost per token should stay flat as the sequence doubles.

`transformers`: a tiny random Emu3ForConditionalGeneration built by transformers; its decoder weights are copied
into nano_emu's GPT (the "transformers" key layout of nano_emu.emu3). Both do constrained greedy CFG-3 generation
(transformers: guidance_scale + negative_prompt_ids + prefix_allowed_tokens_fn, as Emu3's demo), and the tokens
must be identical. Variants of nano_emu: plain, --compile, SJD, SJD + compile. Timings are the best of
--repeats runs taken in turn (A B C A B C ...), so a burst of load on a shared machine hits all of them alike.
"""

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from nano_emu import cli
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.engine import Engine
from nano_emu.sampler import GREEDY, GridConstraint, Guidance, Sampling, cfg_mix, generate_image, plain_decode, sample
from nano_emu.sjd import jacobi_decode
from nano_emu.tokenizer import ByteTokenizer

PROMPT = "a red circle in the top left"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_in_turn(runs: dict, repeats: int, device) -> dict:
    """{name: fn} -> {name: (best seconds, last result)}, running the functions in turn `repeats` times."""
    best, results = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in runs}


# ------------------------------------------------------------------------------------ cache vs recompute


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


def bench_cache(args):
    device = cli.resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    layout, tok = Layout.tiny(codebook_size=args.codebook), ByteTokenizer()
    torch.manual_seed(0)
    config = GPTConfig.tiny(layout.vocab_size, n_layer=args.layers, dim=args.dim, max_seq_len=4096)
    model = GPT(config).to(device, dtype).eval()
    print(f"model: {model.num_params() / 1e6:.2f}M params, {args.layers} layers, dim {args.dim}, {args.dtype}, "
          f"{device}, {torch.get_num_threads()} threads; CFG doubled batch (2 rows) + grid constraint")
    engine = Engine(model)
    rows = []
    for w in (args.w, 2 * args.w):   # the same rows twice as long: 2x the tokens per image
        negative = layout.generation_prompt("", args.h, w, tok)
        prompt = layout.generation_prompt(PROMPT, args.h, w, tok)
        n_tokens = len(layout.grid_schedule(args.h, w))
        gen = torch.Generator(device).manual_seed(0)
        cached = lambda: generate_image(model, layout, [prompt], args.h, w, negative_prompts=[negative],
                                        guidance=Guidance(cfg_scale=3.0), generator=gen, engine=engine)
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


# ------------------------------------------------------------------------------------ against transformers


def tiny_emu3(codebook: int):
    """A random transformers Emu3ForConditionalGeneration on nano_emu's tiny layout, and nano_emu's GPT holding the
    same decoder weights. Sizes as tests/test_emu3.py (dim 64, 2 layers, GQA 4/2)."""
    import transformers
    from nano_emu.emu3 import KEY_LAYOUTS
    from nano_emu.weights import load_state_dict_strict

    layout = Layout.tiny(codebook_size=codebook)
    names = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image token|>", "<|image start|>",
             "<|image end|>", "<|extra_200|>", "<|extra_201|>"]   # pad bos eos img boi eoi eol eof, ids 256..263
    vocabulary = ({f"<|byte {b}|>": b for b in range(256)} | {n: 256 + i for i, n in enumerate(names)}
                  | {f"<|visual token {c:06d}|>": layout.first_visual + c for c in range(codebook)}
                  | {"<image>": layout.vocab_size})   # the placeholder transformers' processor needs, never generated
    vocab_size = layout.vocab_size + 1
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=layout.pad, bos_token_id=layout.bos, eos_token_id=layout.eos,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    vq = dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
              codebook_size=codebook, embed_dim=4, latent_channels=4)
    torch.manual_seed(0)
    ref = transformers.Emu3ForConditionalGeneration(
        transformers.Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocabulary)).eval()
    with torch.no_grad():   # larger random weights: peaked logits, so greedy ties are out of the question
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = KEY_LAYOUTS["transformers"]
    state = {k.removeprefix(names["decoder"]): v for k, v in ref.state_dict().items() if k.startswith(names["decoder"])}
    state["lm_head.weight"] = ref.state_dict()[names["head"]]
    gpt = GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, dim=64, intermediate_size=96,
                        norm_eps=1e-5, rope_theta=5e5, max_seq_len=4096)).eval()
    load_state_dict_strict(gpt, state, source="transformers Emu3ForConditionalGeneration")
    return ref, gpt, layout


def emu3_allowed_tokens(layout: Layout, h: int, w: int, img_index: int):
    """Emu3's prefix_allowed_tokens_fn (image_generation.py): the offset from IMG decides what may come next."""
    visual = list(range(layout.first_visual, layout.vocab_size))

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - img_index
        if offset <= (w + 1) * h and offset % (w + 1) == 0:
            return [layout.eol]
        after = {(w + 1) * h + 1: layout.eof, (w + 1) * h + 2: layout.eoi, (w + 1) * h + 3: layout.eos}
        return [after.get(offset, layout.pad)] if offset > (w + 1) * h else visual

    return allowed


def bench_transformers(args):
    device = torch.device("cpu")
    ref, gpt, layout = tiny_emu3(args.codebook)
    tok = ByteTokenizer()
    print(f"same weights: transformers Emu3ForConditionalGeneration and nano_emu GPT, {gpt.num_params() / 1e6:.2f}M "
          f"params (dim 64, 2 layers), float32, CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"greedy, CFG 3 (nano_emu: one [cond; uncond] batch of 2 rows), grid constraint; best of {args.repeats}")
    plain, compiled = Engine(gpt), Engine(gpt, compile=True)
    jacobi = partial(jacobi_decode, window=args.window)
    variants = {"nano_emu": dict(engine=plain), "nano_emu --compile": dict(engine=compiled),
                f"nano_emu --sjd {args.window}": dict(engine=plain, loop=jacobi),
                f"nano_emu --sjd {args.window} --compile": dict(engine=compiled, loop=jacobi)}
    table = []
    for h, w in ((args.h, args.w), (args.h, 2 * args.w), (2 * args.h, 2 * args.w)):
        cond = layout.generation_prompt(PROMPT, h, w, tok)
        negative = layout.generation_prompt("", h, w, tok)
        n_new = len(layout.grid_schedule(h, w))
        hf = lambda: ref.generate(torch.tensor([cond]), attention_mask=torch.ones(1, len(cond), dtype=torch.long),
                                  negative_prompt_ids=torch.tensor([negative]), guidance_scale=3.0,
                                  prefix_allowed_tokens_fn=emu3_allowed_tokens(layout, h, w, len(cond) - 1),
                                  do_sample=False, max_new_tokens=n_new + 5, eos_token_id=layout.eos,
                                  pad_token_id=layout.pad)[0, len(cond):]
        runs = {"transformers generate": hf}
        for name, kw in variants.items():
            runs[name] = lambda kw=kw: generate_image(gpt, layout, [cond], h, w, negative_prompts=[negative],
                                                      guidance=Guidance(cfg_scale=3.0), sampling=GREEDY, **kw)[0][0]
        warm = {}
        for name, fn in runs.items():   # warm-up; for --compile this is the compilation (once per shape)
            start = time.perf_counter()
            fn()
            warm[name] = time.perf_counter() - start
        forwards = {}
        for name, kw in variants.items():
            before = kw["engine"].forwards
            runs[name]()
            forwards[name] = kw["engine"].forwards - before
        forwards["transformers generate"] = 2 * n_new   # the unbatched CFG processor: two model calls per token
        results = best_in_turn(runs, args.repeats, device)
        expected = results["transformers generate"][1].tolist()
        for name, (seconds, tokens) in results.items():
            if tokens.tolist() != expected:
                raise AssertionError(f"{name} generated other tokens than transformers at {h}x{w}")
            table.append((f"{h}x{w}", n_new, name, seconds, forwards[name], warm[name]))
        print(f"  {h}x{w}: tokens identical across all {len(runs)} runs", flush=True)

    print(f"\n| grid | tokens | implementation | tok/s | ms/token | forwards | vs transformers | first run (s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    reference = {grid: seconds for grid, _, name, seconds, _, _ in table if name == "transformers generate"}
    for grid, n, name, seconds, forwards, warm in table:
        print(f"| {grid} | {n} | {name} | {n / seconds:.0f} | {1e3 * seconds / n:.3f} | {forwards} | "
              f"{reference[grid] / seconds:.2f}x | {warm:.2f} |")
    one, two = f"{args.h}x{args.w}", f"{args.h}x{2 * args.w}"
    cost = {(grid, name): seconds / n for grid, n, name, seconds, _, _ in table}
    print(f"\ncost per token at 2x the length ({two} vs {one}), relative to 1x: " + ", ".join(
        f"{name} {cost[two, name] / cost[one, name]:.2f}x" for name in ["transformers generate", *variants]))


# ------------------------------------------------------------------------------------ SJD on a trained model


def bench_sjd(args):
    import numpy as np

    from nano_emu import data
    from nano_emu.tiny import load_tiny

    pipe = load_tiny(args.ckpt)
    pipe.compile = args.compile
    triples = [t for t in data.TRAIN_TRIPLES for _ in range(args.per_triple)]
    captions = [data.caption(*t) for t in triples]
    print(f"{args.ckpt}: {pipe.gpt.num_params() / 1e6:.2f}M-param GPT, float32, CPU, {torch.get_num_threads()} "
          f"thread(s); {len(captions)} images ({args.per_triple} per seen triple), batch {args.batch}, CFG "
          f"{pipe.guidance.cfg_scale}, sampling {pipe.sampling}; grid {pipe.grid()}{'; compiled' if args.compile else ''}")
    rows = []
    for name, sjd in (("plain", 0), (f"sjd {args.window}", args.window)):
        pipe.sjd = sjd
        pipe.draw(captions[:args.batch], seed=0)   # warm-up (allocates the cache)
        before, images, t_tokens, t_vq = pipe.engine.forwards, [], 0.0, 0.0
        for i in range(0, len(captions), args.batch):
            start = time.perf_counter()
            *_, last = pipe.draw_stream(captions[i:i + args.batch], seed=args.seed + i)   # text -> codes
            t_tokens += time.perf_counter() - start
            start = time.perf_counter()
            images += pipe.decode(last.codes)                                             # codes -> pixels
            t_vq += time.perf_counter() - start
        n_forwards = (pipe.engine.forwards - before) / len(captions) * args.batch
        score = data.score(np.stack([np.asarray(im) for im in images]), triples)
        rows.append((name, n_forwards, t_tokens, t_vq, score))
    n_tokens = len(pipe.layout.grid_schedule(*pipe.grid()))
    print(f"\n| decoding | forwards per draw of {args.batch} ({n_tokens} tokens each) | text -> codes (s) | + VQ decode (s) "
          f"| images/s | adherence | colour | shape | position | unreadable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_forwards, t_tokens, t_vq, s in rows:
        print(f"| {name} | {n_forwards:.1f} | {t_tokens:.2f} | {t_vq:.2f} | {len(captions) / (t_tokens + t_vq):.1f} | "
              f"{s['all']:.1%} | {s['color']:.1%} | {s['shape']:.1%} | {s['position']:.1%} | {s['unreadable']:.1%} |")
    (_, f0, t0, v0, _), (_, f1, t1, v1, _) = rows
    print(f"\nSJD: {f0 / f1:.2f}x fewer forwards; text -> codes {t0 / t1:.2f}x faster, text -> image "
          f"{(t0 + v0) / (t1 + v1):.2f}x faster")


# ------------------------------------------------------------------------------------ Emu3-8B shapes on a GPU


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


def bench_emu3(args):
    from nano_emu.image import tensor_to_image
    from nano_emu.vq import VQConfig, VQModel

    device, dtype = cli.resolve_device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    if args.preset == "emu3_8b":
        config, vq_config, layout = GPTConfig.emu3_8b(), VQConfig.emu3(), Layout.emu3()
    else:   # a smoke test of this code path on any machine
        layout = Layout.tiny(codebook_size=512)
        config, vq_config = GPTConfig.tiny(layout.vocab_size, max_seq_len=4096), VQConfig.tiny()
    gpt = random_model(config, device, dtype)
    vq = VQModel(vq_config).to(device).eval()   # the VQ runs in float32, as Emu3's demos do
    h, w = args.h, args.w
    n_new = len(layout.grid_schedule(h, w))
    g = torch.Generator().manual_seed(0)
    prompt = [layout.bos] + torch.randint(0, 256, (40,), generator=g).tolist() + [layout.boi, layout.img]
    negative = [layout.bos] + torch.randint(0, 256, (60,), generator=g).tolist() + [layout.boi, layout.img]
    weight_bytes = sum(p.numel() * p.element_size() for n, p in gpt.named_parameters() if n != "embed_tokens.weight")
    # a decode step reads every weight but the embedding table, and the whole static cache of both CFG rows
    kv_bytes = (2 * config.n_layer * 2 * config.n_kv_head * (len(negative) + n_new) * config.head_dim
                * gpt.lm_head.weight.element_size())
    print(f"{args.preset}: {gpt.num_params() / 1e9:.2f}B params, {args.dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}; {h}x{w} image = {n_new} tokens, "
          f"CFG 3 (2 rows), top-k {args.top_k}; bytes per decode step: weights {weight_bytes / 1e9:.2f} GB + "
          f"full KV cache {kv_bytes / 1e9:.2f} GB")
    print("| decoding | prefill (s) | forwards | decode ms/forward | ms/token | s/image | GB/s | VQ decode (s) | "
          "peak memory (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    wanted = args.variants.split(",")
    for name, compile_, sjd in (("plain", False, 0), ("compiled", True, 0), ("sjd", False, args.window),
                                ("sjd-compiled", True, args.window)):
        if name not in wanted:
            continue
        decoder = Engine(gpt, compile=compile_)
        kw = dict(negative_prompts=[negative], guidance=Guidance(cfg_scale=3.0), sampling=Sampling(top_k=args.top_k),
                  engine=decoder, loop=partial(jacobi_decode, window=sjd) if sjd else plain_decode,
                  generator=torch.Generator(device).manual_seed(0))
        if compile_:   # compile (and record CUDA graphs) outside the timed run
            generate_image(gpt, layout, [prompt], h, w, **kw)
        sync(device)
        start = time.perf_counter()
        decoder.prefill([prompt, negative], layout.pad, n_new)
        sync(device)
        prefill = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = decoder.forwards
        sync(device)
        start = time.perf_counter()
        _, codes = generate_image(gpt, layout, [prompt], h, w, **kw)
        sync(device)
        generate = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            pixels = vq.decode(codes.to(device))
        image = tensor_to_image(pixels[0].float())   # the PNG-ready image: the whole text -> image path
        sync(device)
        vq_seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
        forwards = decoder.forwards - before - 1
        step = (generate - prefill) / forwards
        print(f"| {name} | {prefill:.3f} | {forwards} | {1e3 * step:.2f} | {1e3 * (generate - prefill) / n_new:.2f} | "
              f"{generate + vq_seconds:.1f} | {(weight_bytes + kv_bytes) / step / 1e9:.0f} | {vq_seconds:.2f} | "
              f"{peak:.1f} |", flush=True)
        decoder.release()
        del image


# ------------------------------------------------------------------------------------ LlamaGen, Chameleon


@torch.no_grad()
def bench_llamagen(args):
    """Seconds per image for a released LlamaGen size with random weights (speed does not depend on them):
    the demo's sampling (CFG 4 on a doubled batch, top-k 2000) through the shared sampler, then VQ-16 decoding."""
    from nano_emu.llamagen import llamagen_pipeline
    from nano_emu.vq import VQConfig, VQModel

    device, dtype = cli.resolve_device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.llamagen(args.llamagen, grid=args.image_size // 16)).to(device, dtype)
    pipe = llamagen_pipeline(gpt, VQModel(VQConfig.llamagen(16)).to(device))
    pipe.compile = args.compile
    h, w = pipe.grid()
    print(f"LlamaGen {args.llamagen} ({gpt.num_params() / 1e6:.0f}M, {args.dtype}) + VQ-16 "
          f"({sum(p.numel() for p in pipe.vq.parameters()) / 1e6:.0f}M, float32) on {device}, "
          f"{torch.get_num_threads()} threads: {args.images} image(s) of {h}x{w} tokens, CFG {pipe.guidance.cfg_scale} "
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
    --steps decode steps timed through the sampler's Engine and extrapolated to the 1025 of an image (the
    cache makes every step cost the same, bench.py's default mode shows it), plus the full VQGAN decoding 32x32."""
    from nano_emu.vq import VQConfig, VQModel

    device, dtype = cli.resolve_device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.chameleon("7B", n_layer=args.chameleon_layers)).to(device, dtype).eval()
    vq = VQModel(VQConfig.chameleon()).to(device).eval()
    print(f"Anole-shaped GPT, {args.chameleon_layers} of 32 layers ({gpt.num_params() / 1e9:.2f}B, {args.dtype}) + "
          f"VQGAN ({sum(p.numel() for p in vq.parameters()) / 1e6:.0f}M, float32) on {device}, "
          f"{torch.get_num_threads()} threads, CFG batch 2")
    prompt = [0] + list(range(100, 120)) + [8197]
    decoder = Engine(gpt, compile=args.compile)
    logits, length = decoder.prefill([prompt, [0, 8197]], 1, 1025)
    token = logits.argmax(-1)[:, None]                                          # (2, 1)
    input_pos = torch.tensor([length], device=device)
    decoder.step(token, input_pos)   # warm-up (and the compile, with --compile)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        input_pos += 1
        decoder.step(token, input_pos)
    sync(device)
    per_step = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    vq.decode(torch.randint(0, 8192, (1, 32, 32), device=device))
    sync(device)
    decoded = time.perf_counter() - start
    print(f"GPT: {1e3 * per_step:.0f} ms/step over {args.steps} steps -> {1025 * per_step:.0f}s for 1024 codes + EOI; "
          f"VQ decode 512x512: {decoded:.1f}s; {1025 * per_step + decoded:.0f} s per image")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", nargs="?", default="cache", choices=["cache", "transformers", "sjd", "emu3"])
    parser.add_argument("--device", type=cli.device, default="cpu", help="cpu | cuda | mps (cache, emu3)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; transformers: 1)")
    parser.add_argument("--layers", type=int, default=4, help="cache: GPT layers (tiny preset: 4)")
    parser.add_argument("--dim", type=int, default=256, help="cache: GPT width (tiny preset: 256)")
    parser.add_argument("--codebook", type=int, default=1024, help="VQ codebook size (visual vocabulary)")
    parser.add_argument("--h", type=int, default=16, help="grid rows")
    parser.add_argument("--w", type=int, default=16, help="grid columns at 1x (2x doubles them)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument("--skip-peer", action="store_true", help="cache: skip the slow no-cache peer run")
    parser.add_argument("--window", type=int, default=16, help="SJD window (tokens verified per forward)")
    parser.add_argument("--ckpt", help="sjd: a train_tiny.py output folder")
    parser.add_argument("--per-triple", type=int, default=2, help="sjd: images per seen (colour, shape, position)")
    parser.add_argument("--batch", type=int, default=1, help="sjd: images per draw call")
    parser.add_argument("--compile", action="store_true", help="sjd, --llamagen, --chameleon-layers: compile the decode step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="emu3_8b", choices=["emu3_8b", "tiny"], help="emu3: model shapes")
    parser.add_argument("--top-k", type=int, default=2048, help="emu3: Emu3-Gen's top-k")
    parser.add_argument("--variants", default="plain,compiled,sjd,sjd-compiled",
                        help="emu3: which of plain,compiled,sjd,sjd-compiled to run")
    parser.add_argument("--llamagen", default=None, help="instead: s/image of a LlamaGen size (GPT-B, ...) + VQ-16, "
                        "random weights of the released shapes, the demo's sampling")
    parser.add_argument("--chameleon-layers", type=int, default=0, help="instead: s per 512x512 image of an "
                        "Anole-shaped GPT with this many layers (7B width and vocabulary) + Chameleon's VQGAN")
    parser.add_argument("--steps", type=int, default=16, help="with --chameleon-layers: decode steps timed")
    parser.add_argument("--image-size", type=int, default=256, help="with --llamagen: 256 or 384")
    parser.add_argument("--images", type=int, default=1, help="with --llamagen: images drawn as one batch")
    args = parser.parse_args()
    if args.llamagen or args.chameleon_layers:
        args.bench = "llamagen" if args.llamagen else "chameleon"
    if args.ckpt and args.bench == "cache":
        args.bench = "sjd"
    if args.bench == "sjd" and not args.ckpt:
        parser.error("sjd needs --ckpt (a train_tiny.py output folder)")
    if args.threads or args.bench in ("transformers", "sjd"):
        # one thread: a model this small gains nothing from two, and OpenMP threads waiting on each other make
        # timings on a shared 2-core machine swing by 10x
        torch.set_num_threads(args.threads or 1)
        {"cache": bench_cache, "transformers": bench_transformers, "sjd": bench_sjd, "emu3": bench_emu3,
     "llamagen": bench_llamagen, "chameleon": bench_chameleon}[args.bench](args)
