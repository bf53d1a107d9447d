"""Decode benchmarks, each in one process so every figure is a ratio against a peer measured beside it.

    python bench.py                          # cache (the default): cached decode vs no-cache recompute
    python bench.py transformers             # against transformers' generate() on the same weights (CPU)
    python bench.py sjd --ckpt out/tiny      # speculative Jacobi decoding on a trained tiny model: forwards,
                                             #   wall time and drawing adherence, with and without SJD
                                             #   (--transformers: the same model in transformers' Emu3 beside it)
    python bench.py emu3 --device cuda       # Emu3-Gen shapes with random bf16 weights, a 90x90 image with CFG
    python bench.py llamagen GPT-B           # s per 256x256 image: LlamaGen GPT-B + VQ-16, random weights, with CFG
    python bench.py chameleon --layers 2     # s per 512x512 Anole-shaped image: 7B width and vocabulary, 2 of 32 layers
    python bench.py gpu --out gpu.md         # the whole GPU table (Emu3, LlamaGen-XL, Chameleon-7B) as markdown
    python bench.py gpu --dry-run            # the same code path at tiny sizes on a CPU, in seconds

`python bench.py SUBCOMMAND --help` says what each one measures and lists its own flags.

`cache`: a tiny random GPT draws an image with CFG (doubled batch) and the grid constraint; the peer recomputes
the whole sequence every step. With the cache the cost per token should stay flat as the sequence doubles.

`transformers`: a tiny random Emu3ForConditionalGeneration built by transformers; its decoder weights are copied
into nano_emu's GPT (the "transformers" key layout of nano_emu.emu3; the peer's section below). Both do
constrained greedy CFG-3 generation (transformers: guidance_scale + negative_prompt_ids + prefix_allowed_tokens_fn,
as Emu3's demo), and the tokens must be identical. Variants of nano_emu: plain, --compile, SJD, SJD + compile. Timings are the best of
--repeats runs taken in turn (A B C A B C ...), so a burst of load on a shared machine hits all of them alike.
"""

import argparse
import itertools
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from nano_emu import benchmark, cli
from nano_emu.benchmark import sync
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.engine import Engine
from nano_emu.sampler import GREEDY, GridConstraint, Guidance, cfg_mix, generate_image, sample
from nano_emu.sjd import jacobi_decode
from nano_emu.tokenizer import ByteTokenizer

PROMPT = "a red circle in the top left"


# ---------------------------------------------------------------------------------------------------------------
# the transformers peer: nano_emu's models inside transformers' Emu3ForConditionalGeneration, measured beside them
#
# - tiny_emu3: a random Emu3 built by transformers and nano_emu's GPT holding the same decoder weights
#   (bench.py transformers: greedy tokens must be identical);
# - emu3_from_tiny: a trained train_tiny.py checkpoint converted into Emu3 through the literal transformers key
#   layout, as a user would (bench.py sjd --transformers: images/s of transformers' generate on the same model);
# - transformers_draw: codes drawn by transformers' generate with a Pipeline's prompts and sampling (CFG through
#   negative_prompt_ids, Emu3's prefix_allowed_tokens_fn as the grid constraint).


def emu3_model(layout: Layout, config: GPTConfig):
    """An (untrained) transformers Emu3ForConditionalGeneration over nano_emu's layout with a GPT config's decoder
    shapes: the special tokens under Emu3's names at the layout's ids, the visual tokens, and one id more for the
    "<image>" placeholder transformers' processor needs (never generated: the grid constraint forbids it)."""
    import transformers

    specials = dict(zip(("pad", "bos", "eos", "img", "boi", "eoi", "eol", "eof"),
                        ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image token|>", "<|image start|>",
                         "<|image end|>", "<|extra_200|>", "<|extra_201|>")))
    vocabulary = {name: getattr(layout, field) for field, name in specials.items()}
    taken = set(vocabulary.values())
    vocabulary |= {f"<|text {i}|>": i for i in range(layout.first_visual) if i not in taken}   # the caption ids
    vocabulary |= {f"<|visual token {c:06d}|>": layout.first_visual + c for c in range(layout.codebook_size)}
    vocabulary["<image>"] = layout.vocab_size
    text = dict(vocab_size=layout.vocab_size + 1, hidden_size=config.dim, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.n_kv_head, max_position_embeddings=config.max_seq_len,
                rms_norm_eps=config.norm_eps, pad_token_id=layout.pad, bos_token_id=layout.bos,
                eos_token_id=layout.eos, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    vq = dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
              codebook_size=layout.codebook_size, embed_dim=4, latent_channels=4)   # unused: codes decode in nano_emu
    return transformers.Emu3ForConditionalGeneration(
        transformers.Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocabulary)).eval()


def tiny_emu3(codebook: int, dim: int = 64, n_layer: int = 2):
    """A random transformers Emu3ForConditionalGeneration on nano_emu's tiny layout, and nano_emu's GPT holding the
    same decoder weights. Default sizes as tests/test_emu3.py (dim 64, 2 layers, GQA 4/2, SwiGLU width 1.5 dim)."""
    from nano_emu.emu3 import KEY_LAYOUTS
    from nano_emu.weights import load_state_dict_strict

    layout = Layout.tiny(codebook_size=codebook)
    config = GPTConfig(vocab_size=layout.vocab_size + 1, n_layer=n_layer, n_head=4, n_kv_head=2, dim=dim,
                       intermediate_size=3 * dim // 2, norm_eps=1e-5, rope_theta=5e5, max_seq_len=4096)
    torch.manual_seed(0)
    ref = emu3_model(layout, config)
    with torch.no_grad():   # larger random weights: peaked logits, so greedy ties are out of the question
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = KEY_LAYOUTS["transformers"]
    state = {k.removeprefix(names["decoder"]): v for k, v in ref.state_dict().items() if k.startswith(names["decoder"])}
    state["lm_head.weight"] = ref.state_dict()[names["head"]]
    gpt = GPT(config).eval()
    load_state_dict_strict(gpt, state, source="transformers Emu3ForConditionalGeneration")
    return ref, gpt, layout


def emu3_from_tiny(pipe):
    """A trained tiny checkpoint's GPT inside transformers' Emu3ForConditionalGeneration, through the literal
    transformers key layout (model.text_model.* + lm_head.weight), as a user converting it would: strict, and the
    placeholder row of the embedding and head left at zero."""
    from nano_emu.emu3 import KEY_LAYOUTS

    names = KEY_LAYOUTS["transformers"]
    ref = emu3_model(pipe.layout, pipe.gpt.config)
    state = {names["decoder"] + k: v for k, v in pipe.gpt.state_dict().items() if k != "lm_head.weight"}
    state[names["head"]] = pipe.gpt.state_dict()["lm_head.weight"]
    for key in (names["decoder"] + "embed_tokens.weight", names["head"]):   # + the "<image>" row
        state[key] = torch.cat([state[key], torch.zeros(1, state[key].shape[1])])
    state |= {k: v for k, v in ref.state_dict().items() if k.startswith(names["vq"])}   # its own (unused) VQ
    ref.load_state_dict(state, strict=True)
    return ref


def transformers_draw(ref, pipe, captions: list[str], seed: int) -> torch.Tensor:
    """Codes (B, h, w) drawn by transformers' generate() with the checkpoint's sampling (CFG through
    negative_prompt_ids, Emu3's prefix_allowed_tokens_fn as the grid constraint), one call per run of captions of the
    same token length (no padding needed). The captions' prompts are the ones nano_emu's Pipeline builds."""
    layout, (h, w) = pipe.layout, pipe.grid()
    g, sampling = pipe.guidance.cfg_scale, pipe.sampling
    prompts = [layout.generation_prompt(c + pipe.prompt_suffix, h, w, pipe.tokenizer) for c in captions]
    negative = layout.generation_prompt(pipe.negative_prompt, h, w, pipe.tokenizer)
    n_new = len(layout.grid_schedule(h, w))
    codes = []
    for length, group in itertools.groupby(prompts, key=len):
        ids = torch.tensor(list(group))
        torch.manual_seed(seed)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids),
                           negative_prompt_ids=torch.tensor([negative] * len(ids)),
                           guidance_scale=g, prefix_allowed_tokens_fn=emu3_allowed_tokens(layout, h, w, length - 1),
                           do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                           top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0, max_new_tokens=n_new + 5,
                           eos_token_id=layout.eos, pad_token_id=layout.pad)[:, length:]
        for row in out:
            visual = row[(row >= layout.first_visual) & (row < layout.vocab_size)][:h * w]
            codes.append((visual - layout.first_visual).view(h, w))
    return torch.stack(codes)


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


TRANSFORMERS_VARIANTS = ("plain", "compiled", "sjd", "sjd-compiled")


def bench_transformers(args):
    device = torch.device("cpu")
    ref, gpt, layout = tiny_emu3(args.codebook, args.dim, args.layers)
    tok = ByteTokenizer()
    print(f"same weights: transformers Emu3ForConditionalGeneration and nano_emu GPT, {gpt.num_params() / 1e6:.2f}M "
          f"params (dim {args.dim}, {args.layers} layers), float32, CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"greedy, CFG 3 (nano_emu: one [cond; uncond] batch of 2 rows), grid constraint; best of {args.repeats}")
    plain, compiled = Engine(gpt), Engine(gpt, compile=True)
    jacobi = partial(jacobi_decode, window=args.window)
    variants = {"nano_emu": dict(engine=plain), "nano_emu --compile": dict(engine=compiled),
                f"nano_emu --sjd {args.window}": dict(engine=plain, loop=jacobi),
                f"nano_emu --sjd {args.window} --compile": dict(engine=compiled, loop=jacobi)}
    wanted = args.variants.split(",")
    variants = {name: kw for name, kw, short in zip(variants, variants.values(), TRANSFORMERS_VARIANTS)
                if short in wanted}
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

    print("\n| grid | tokens | implementation | tok/s | ms/token | forwards | vs transformers | first run (s) |")
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

    from nano_emu import shapes
    from nano_emu.tiny import load_tiny

    pipe = load_tiny(args.ckpt)
    pipe.compile = args.compile
    triples = [t for t in shapes.TRAIN_TRIPLES for _ in range(args.per_triple)]
    triples = triples[:args.max_images]
    captions = [shapes.caption(*t) for t in triples]
    print(f"{args.ckpt}: {pipe.gpt.num_params() / 1e6:.2f}M-param GPT, float32, CPU, {torch.get_num_threads()} "
          f"thread(s); {len(captions)} images ({args.per_triple} per seen triple), batch {args.batch}, CFG "
          f"{pipe.guidance.cfg_scale}, sampling {pipe.sampling}; grid {pipe.grid()}{'; compiled' if args.compile else ''}")
    rows = []
    variants = [("plain", 0, False), (f"sjd {args.window}", args.window, False)]
    if args.coupled:
        variants.append((f"sjd {args.window} coupled", args.window, True))
    if args.transformers:   # the same weights in transformers' Emu3, drawn with its generate()
        ref = emu3_from_tiny(pipe)
        variants.insert(0, ("transformers generate", None, False))
    for name, sjd, coupled in variants:
        pipe.sjd, pipe.sjd_coupled = sjd or 0, coupled
        if sjd is None:
            codes_of = lambda batch, seed: transformers_draw(ref, pipe, batch, seed)
        else:
            codes_of = lambda batch, seed: list(pipe.draw_stream(batch, seed=seed))[-1].codes
        codes_of(captions[:args.batch], 0)   # warm-up (allocates the cache)
        before, images, t_tokens, t_vq = pipe.engine.forwards, [], 0.0, 0.0
        for i in range(0, len(captions), args.batch):
            start = time.perf_counter()
            codes = codes_of(captions[i:i + args.batch], args.seed + i)                 # text -> codes
            t_tokens += time.perf_counter() - start
            start = time.perf_counter()
            images += pipe.decode(codes)                                                # codes -> pixels
            t_vq += time.perf_counter() - start
        n_forwards = (pipe.engine.forwards - before) / len(captions) * args.batch
        if sjd is None:   # the unbatched CFG processor: two model calls per token, for every run of equal lengths
            n_forwards = 2 * len(pipe.layout.grid_schedule(*pipe.grid()))
        score = shapes.score(np.stack([np.asarray(im) for im in images]), triples)
        rows.append((name, n_forwards, t_tokens, t_vq, score))
    n_tokens = len(pipe.layout.grid_schedule(*pipe.grid()))
    print(f"\n| decoding | forwards per draw of {args.batch} ({n_tokens} tokens each) | text -> codes (s) | + VQ decode (s) "
          f"| images/s | adherence | colour | shape | position | unreadable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_forwards, t_tokens, t_vq, s in rows:
        print(f"| {name} | {n_forwards:.1f} | {t_tokens:.2f} | {t_vq:.2f} | {len(captions) / (t_tokens + t_vq):.1f} | "
              f"{s['all']:.1%} | {s['color']:.1%} | {s['shape']:.1%} | {s['position']:.1%} | {s['unreadable']:.1%} |")
    for base, f0, t0, v0, _ in rows[:1 + args.transformers]:   # against plain, and against transformers' generate
        for name, f1, t1, v1, _ in rows:
            if name != base and name != "transformers generate":
                print(f"\n{name} against {base}: {f0 / f1:.2f}x fewer forwards; text -> codes {t0 / t1:.2f}x faster, "
                      f"text -> image {(t0 + v0) / (t1 + v1):.2f}x faster")


# ------------------------------------------------------------------------------------ the released shapes


def bench_emu3(args):
    benchmark.emu3(cli.resolve_device(args.device), getattr(torch, args.dtype), args.h, args.w, args.window,
                   args.top_k, args.variants.split(","), tiny=args.preset == "tiny")


def bench_llamagen(args):
    benchmark.llamagen(cli.resolve_device(args.device), getattr(torch, args.dtype), args.size, args.image_size,
                       args.images, args.compile, tiny=args.tiny)


def bench_chameleon(args):
    benchmark.chameleon(cli.resolve_device(args.device), getattr(torch, args.dtype), args.layers, args.steps,
                        args.compile, tiny=args.tiny)


def bench_gpu(args):
    device = cli.resolve_device("cpu" if args.dry_run else args.device)
    dtype = torch.float32 if args.dry_run else getattr(torch, args.dtype)
    h, w = (4, 4) if args.dry_run else (args.h, args.w)
    table = benchmark.gpu_table(device, dtype, args.peak_gbps, h, w, args.window, tiny=args.dry_run, out=args.out)
    print("\n" + table, end="")
    if args.out:
        print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------ command line


SUBCOMMANDS = ("cache", "transformers", "sjd", "emu3", "llamagen", "chameleon", "gpu")


SHORT = dict(cache="decode tokens/s with the KV cache vs recomputing (default)",
             transformers="against transformers' generate() on the same weights, tokens checked",
             sjd="speculative Jacobi decoding on a trained tiny model: forwards, time, adherence",
             emu3="Emu3-Gen shapes, random weights: s/image, ms/step, GB/s, peak memory",
             llamagen="s per image of a LlamaGen size, random weights",
             chameleon="s per image of an Anole-shaped model cut to a few layers",
             gpu="the whole GPU table (Emu3, LlamaGen-XL, Chameleon-7B) as markdown; --dry-run on a CPU")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="bench", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    def command(name, fn, help):
        p = sub.add_parser(name, help=SHORT[name], description=help)
        p.set_defaults(run=fn)
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1, see below)")
        return p

    def grid(p, h, w):
        p.add_argument("--h", type=int, default=h, help="grid rows")
        p.add_argument("--w", type=int, default=w, help="grid columns")

    def device(p, dtype="float32", default="cpu"):
        p.add_argument("--device", type=cli.device, default=default, help="cpu | cuda | mps | auto")
        p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])

    p = command("cache", bench_cache, "cache: tokens/s of a tiny random GPT drawing one image with CFG (doubled "
                "batch) and the grid constraint, with the static KV cache against a peer that recomputes the whole "
                "sequence every step, at --w and 2x --w columns (the cost per token with the cache stays about flat)")
    device(p)
    grid(p, 16, 16)
    p.add_argument("--layers", type=int, default=4, help="GPT layers (tiny preset: 4)")
    p.add_argument("--dim", type=int, default=256, help="GPT width (tiny preset: 256)")
    p.add_argument("--codebook", type=int, default=1024, help="VQ codebook size (visual vocabulary)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--skip-peer", action="store_true", help="skip the slow no-cache peer run")

    p = command("transformers", bench_transformers, "transformers: tokens/s of transformers' Emu3 generate() against "
                "nano_emu on the same random weights (CPU, float32), greedy CFG 3 + grid constraint, at three grids; "
                "the tokens of every run are checked identical to transformers'")
    grid(p, 16, 16)
    p.add_argument("--dim", type=int, default=64, help="model width (4 query / 2 kv heads)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--codebook", type=int, default=1024, help="visual vocabulary")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation, taken in turn (best)")
    p.add_argument("--window", type=int, default=16, help="SJD window (tokens verified per forward)")
    p.add_argument("--variants", default=",".join(TRANSFORMERS_VARIANTS),
                   help=f"nano_emu variants, of {','.join(TRANSFORMERS_VARIANTS)}")

    p = command("sjd", bench_sjd, "sjd: speculative Jacobi decoding on a trained tiny model (train_tiny.py's --out): "
                "forwards per image, text -> codes and VQ seconds, images/s and drawing adherence, plain against SJD "
                "(and coupled SJD with --coupled), same seeds")
    p.add_argument("--ckpt", required=True, help="a train_tiny.py output folder")
    p.add_argument("--window", type=int, default=16, help="SJD window (tokens verified per forward)")
    p.add_argument("--per-triple", type=int, default=2, help="images per seen (colour, shape, position)")
    p.add_argument("--batch", type=int, default=1, help="images per draw call")
    p.add_argument("--max-images", type=int, default=None, help="draw only the first N of them (a quick look)")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--coupled", action="store_true", help="add a row for coupled SJD (MC-SJD, sjd.couple)")
    p.add_argument("--transformers", action="store_true", help="add a row for the same weights in transformers' "
                   "Emu3ForConditionalGeneration (literal key layout), drawn with its generate() and the same sampling")
    p.add_argument("--seed", type=int, default=0)

    p = command("emu3", bench_emu3, "emu3: Emu3-Gen's shapes (8.5B, random weights made on the device) drawing one "
                "image with CFG 3 and top-k: prefill s, decode ms per forward and per token, s per image, achieved "
                "GB/s, VQ decode s and peak memory of text -> image, per decoding variant")
    device(p, "bfloat16", "auto")
    grid(p, 90, 90)
    p.add_argument("--preset", default="emu3_8b", choices=["emu3_8b", "tiny"], help="model shapes (tiny: smoke test)")
    p.add_argument("--window", type=int, default=16, help="SJD window")
    p.add_argument("--top-k", type=int, default=2048, help="Emu3-Gen's top-k")
    p.add_argument("--variants", default=",".join(benchmark.EMU3_VARIANTS),
                   help=f"which of {','.join(benchmark.EMU3_VARIANTS)} to run")

    p = command("llamagen", bench_llamagen, "llamagen: seconds per image of a released LlamaGen size (random weights "
                "of its shapes) + VQ-16, the demo's sampling (CFG 4, top-k 2000)")
    device(p)
    p.add_argument("size", nargs="?", default="GPT-B", help="GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B")
    p.add_argument("--image-size", type=int, default=256, help="256 or 384")
    p.add_argument("--images", type=int, default=1, help="images drawn as one batch")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--tiny", action="store_true", help="tiny dims (smoke test)")

    p = command("chameleon", bench_chameleon, "chameleon: seconds per 512x512 image of an Anole-shaped GPT (7B width "
                "and vocabulary, random weights) cut to --layers layers: --steps decode steps timed and extrapolated "
                "to an image's 1025, plus Chameleon's VQGAN decoding")
    device(p)
    p.add_argument("--layers", type=int, default=2, help="layers of the 7B's 32")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--tiny", action="store_true", help="tiny dims (smoke test)")

    p = command("gpu", bench_gpu, "gpu: the whole GPU table in one run, written as markdown to --out: Emu3-Gen "
                "(random bf16 weights) 90x90 = 720x720 px with CFG plain, compiled and SJD (prefill s, ms/step, "
                "s/image, GB/s and its share of --peak-gbps, peak memory), a LlamaGen-XL image, a Chameleon-7B step")
    device(p, "bfloat16", "auto")
    grid(p, 90, 90)
    p.add_argument("--window", type=int, default=16, help="SJD window")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="the card's peak memory bandwidth (H100 SXM: 3350)")
    p.add_argument("--out", help="markdown file to write the table to")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU in seconds: checks the code path")
    return top


def main(argv=None):
    top = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        top.error(f"unknown benchmark {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["cache", *argv]   # `python bench.py [--flags]`: the cache benchmark, as the README calls it
    args = top.parse_args(argv)
    if args.bench == "gpu" and not args.dry_run and cli.resolve_device(args.device).type != "cuda":
        top.error("gpu needs a CUDA device (an 8B model on a CPU would take hours); --dry-run runs it tiny on the CPU")
    # one thread by default: a small model gains nothing from two, and OpenMP threads waiting on each other make
    # timings on a shared 2-core machine swing by 10x; --threads N says otherwise
    torch.set_num_threads(args.threads or 1)
    args.run(args)


if __name__ == "__main__":
    main()
