"""What a training step costs, eager against torch.compile, in one process: the speedrun's compile lever measured.

    python experiments/train_step.py                   # the shapes default's VQ and GPT steps
    python experiments/train_step.py --world scenes    # the scenes preset's GPT step (same VQ)
    python experiments/train_step.py --eager-only --train-flags "--vq-batch 16 --gpt-batch 48"   # a step vs its batch

Builds train_tiny.py's models at the preset's sizes (random weights: a step's cost does not depend on their
values) and its batches (the world's images; the GPT's mixed generation / understanding strings from a small
pool of random codes of the real grid), then times --steps steps of each stage eagerly and compiled
(`torch.compile`, dynamic for the GPT: its strings change length from batch to batch; static shapes for the VQ,
whose batches do not), after --warmup steps.
Prints the compile time (the warm-up steps of the compiled model, which a run pays inside its budget), the ms per
step of each, the speed-up, and how many steps the compile time would have bought.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tiny  # noqa: E402
from nano_emu.gpt import GPT  # noqa: E402
from nano_emu.train import sequences, weighted_loss  # noqa: E402
from nano_emu.vq import VQModel  # noqa: E402
from nano_emu.image import to_tensor  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--world", choices=["shapes", "scenes"], default="shapes")
p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the compiled model compiles here)")
p.add_argument("--stages", default="vq,gpt", help="which stages, of vq,gpt")
p.add_argument("--train-flags", default="", help="train_tiny.py flags that shape the models and batches, "
               "e.g. '--vq-batch 16' or '--vq-arch plain --vq-ch-mult 1,1,2,4'")
p.add_argument("--eager-only", action="store_true", help="time the eager step only (no compiling)")
args = p.parse_args()

run_args = train_tiny.fill_from_preset(train_tiny.parse_args(["--world", args.world, *args.train_flags.split()]))
worlds, tokenizer, _, vq_cfg, layout = train_tiny.prepare(run_args)
world, rng = worlds[0], np.random.default_rng(0)
print(f"{args.world} preset, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")


def time_steps(model, loss_of, batches):
    """(warm-up seconds, ms per timed step) of training steps (AdamW, as train.fit) on loss_of(model, batch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step(batch):
        loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for batch in batches[:args.warmup]:
        step(batch)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    return warm, (time.perf_counter() - start) / (len(batches) - args.warmup) * 1e3


def compare(name, make, loss_of, batches, dynamic):
    torch.manual_seed(0)
    eager_warm, eager_ms = time_steps(make(), loss_of, batches)
    if args.eager_only:
        print(f"{name}: eager {eager_ms:.1f} ms/step")
        return
    torch.manual_seed(0)
    compiled_warm, compiled_ms = time_steps(torch.compile(make(), dynamic=dynamic), loss_of, batches)
    compile_s = compiled_warm - eager_warm
    print(f"{name}: eager {eager_ms:.1f} ms/step, compiled {compiled_ms:.1f} ms/step ({eager_ms / compiled_ms:.2f}x), "
          f"compiling took {compile_s:.1f} s = {compile_s / eager_ms * 1e3:.0f} eager steps")


n = args.warmup + args.steps
if "vq" in args.stages:
    images = [to_tensor(world.sample(run_args.vq_batch, rng).pixels) for _ in range(n)]

    compare(f"VQ (batch {run_args.vq_batch}, {run_args.vq_arch})", lambda: VQModel(vq_cfg),
            lambda model, x: model(x).loss, images, dynamic=False)

if "gpt" in args.stages:
    config = train_tiny.gpt_config(run_args, layout)
    examples = world.sample(4 * run_args.gpt_batch, rng)
    side = world.image_size // vq_cfg.spatial_factor
    codes = torch.randint(vq_cfg.codebook_size, (len(examples.captions), side, side))
    options = dict(p_drop_caption=run_args.p_drop_caption, visual_weight=run_args.visual_weight,
                   understood_image_weight=run_args.understood_image_weight, answer_weight=run_args.answer_weight)
    batches = []
    for _ in range(n):
        pick = rng.integers(len(codes), size=run_args.gpt_batch)
        batches.append(sequences(layout, tokenizer, codes[pick], [examples.captions[i] for i in pick],
                                 [examples.answers[i] for i in pick], rng, **options))

    compare(f"GPT ({run_args.gpt_dim} x {run_args.gpt_layers}, batch {run_args.gpt_batch})", lambda: GPT(config),
            lambda model, batch: weighted_loss(model(batch[0]), batch[1], batch[2]), batches, dynamic=True)
