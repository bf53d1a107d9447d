"""What SJD's fewer forwards can buy in wall time on this machine: a window forward's cost against a one-token one.

    python experiments/sjd_cost.py --ckpt out/tiny --windows 8,16,24,32,48 --threads 2 [--compile]

Speculative Jacobi decoding (nano_emu/sjd.py) trades forwards of one token for fewer forwards of a window of W
tokens. It saves wall time only as far as a W-token forward costs less than the one-token forwards it replaces:
if the forward were SJD's only cost, its speed-up could at most be

    (forwards per image, plain / forwards per image, SJD)  x  (ms per one-token forward / ms per W-token forward)

For the checkpoint's GPT with CFG's [cond; uncond] rows, this prints per window: ms per decode forward (median of
--rounds rounds taken in turn over all windows, so load bursts hit every window alike), the matmul and attention
FLOPs of that forward and the rate they ran at, coupled SJD's forwards per image on --images seen prompts (batch 1,
the same seeds for every window; plain decoding as window 1), that ceiling, and the measured text -> codes speed-up
(which also pays SJD's own sampling work). A one-token forward is bound by per-operation overhead, a wide one by
arithmetic: where the wide one runs near the machine's FLOP rate, no tuning of the loop lifts the ceiling.
"""
import argparse
import statistics
import time

import torch

from nano_emu import shapes
from nano_emu.tiny import load_tiny

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--ckpt", default="out/tiny", help="a train_tiny.py output folder")
p.add_argument("--windows", default="8,16,24,32,48", help="SJD windows to measure (plain decoding is window 1)")
p.add_argument("--images", type=int, default=48, help="seen prompts drawn per window to count forwards")
p.add_argument("--rounds", type=int, default=7, help="timing rounds (each times every window in turn)")
p.add_argument("--steps", type=int, default=40, help="forwards timed per window and round")
p.add_argument("--threads", type=int, default=2, help="torch threads (the machine's two cores by default)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--compile", action="store_true", help="torch.compile the decode step (one compiled shape per window)")
args = p.parse_args()
torch.set_num_threads(args.threads)
windows = [1] + sorted({int(w) for w in args.windows.split(",")} - {1})

pipe = load_tiny(args.ckpt)
pipe.compile = args.compile
if args.compile:   # one compiled step per window and per kind of call (plain's last-logits step, prefill's sizes)
    torch._dynamo.config.recompile_limit = 64
captions = [shapes.caption(*t) for t in shapes.TRAIN_TRIPLES][:args.images]
gpt, engine, rows = pipe.gpt, pipe.engine, pipe.guidance.branches

# forwards per image and text -> codes seconds, per window (coupled SJD; window 1 = plain decoding)
forwards, seconds = {}, {}
for w in windows:
    pipe.sjd, pipe.sjd_coupled = (0, False) if w == 1 else (w, True)
    list(pipe.draw_stream(captions[:1], seed=args.seed))   # warm-up, allocates the cache
    before, start = engine.forwards, time.perf_counter()
    for i, caption in enumerate(captions):
        list(pipe.draw_stream([caption], seed=args.seed + i))
    seconds[w] = time.perf_counter() - start
    forwards[w] = (engine.forwards - before) / len(captions)

# the cost of one decode forward of w tokens, on the cache the draws left (values do not change a forward's cost)
slots = engine.cache.max_len
first = slots - max(windows) - 1
tokens = {w: torch.randint(pipe.layout.first_visual, pipe.layout.vocab_size, (rows, w)) for w in windows}
positions = {w: torch.arange(first, first + w) for w in windows}
times = {w: [] for w in windows}
for _ in range(args.rounds):
    for w in windows:
        for _ in range(3):
            engine.step(tokens[w], positions[w], every_position=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step(tokens[w], positions[w], every_position=True)
        times[w].append((time.perf_counter() - start) / args.steps)
ms = {w: 1e3 * statistics.median(times[w]) for w in windows}

# multiply-adds per forward: every Linear's weight once per fed row, and attention's q.k and p.v over the cache
linear = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))
cfg = gpt.config
attention = 2 * cfg.n_layer * cfg.n_head * cfg.head_dim * slots
flops = {w: 2 * rows * w * (linear + attention) for w in windows}

print(f"{args.ckpt}: {gpt.num_params() / 1e6:.2f}M-param GPT (dim {cfg.dim}, {cfg.n_layer} layers), float32, CPU, "
      f"{torch.get_num_threads()} thread(s){', compiled' if args.compile else ''}, {rows} rows per forward (CFG), "
      f"cache {slots} slots; {len(captions)} images per window, {pipe.sampling}")
print("\n| window | ms per forward | vs one token | MFLOP per forward | GFLOP/s | forwards per image | fewer forwards "
      "| ceiling on the speed-up | measured text -> codes speed-up |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for w in windows:
    fewer, cost = forwards[1] / forwards[w], ms[w] / ms[1]
    print(f"| {'1 (plain)' if w == 1 else w} | {ms[w]:.2f} | {cost:.2f}x | {flops[w] / 1e6:.1f} | "
          f"{flops[w] / ms[w] / 1e6:.1f} | {forwards[w]:.1f} | {fewer:.2f}x | {fewer / cost:.2f}x | "
          f"{seconds[1] / seconds[w]:.2f}x |")
