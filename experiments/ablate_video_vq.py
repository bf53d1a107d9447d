"""Ablations of the --video VQ stage: train_tiny.py's own VQ stage, measured on images AND clips.

    python experiments/ablate_video_vq.py --tag width8 --set embed_dim=8 --set z_channels=8 -- --video

Everything after `--` is a train_tiny.py flag (pass --video for the clip curriculum); --set overrides a
VQConfig.tiny field. Appends one JSON line to experiments/results_video_vq.jsonl: seconds, PSNR and checker on
the reconstructions of the images and clips that train_tiny.py's evaluation draws (same seeds).
"""
import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tiny  # noqa: E402
from nano_emu import shapes  # noqa: E402
from nano_emu import evaluate as ev  # noqa: E402
from nano_emu.train import Distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tag", default="")
p.add_argument("--set", action="append", default=[], help="VQConfig.tiny override, e.g. embed_dim=8")
p.add_argument("--keep", default=None, help="output folder to keep the VQ in (default: a temporary one)")
ours, rest = sys.argv[1:], []
if "--" in ours:
    i = ours.index("--")
    ours, rest = ours[:i], ours[i + 1:]
mine = p.parse_args(ours)
overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in mine.set)}

out = Path(mine.keep or tempfile.mkdtemp())
args = train_tiny.parse_args(rest + ["--out", str(out), "--device", "cpu"])
train_tiny.fill_from_preset(args)
out.mkdir(parents=True, exist_ok=True)
args.out = out

plan = train_tiny.prepare(args)
start = time.time()
vq, history = train_tiny.vq_stage(args, plan.worlds, replace(plan.vq_cfg, **overrides), torch.device("cpu"),
                                  Distributed(), nullcontext())
seconds = time.time() - start

rng = np.random.default_rng([args.seed, 3])   # train_tiny.evaluate's images
images, _, attrs = shapes.sample_shapes(2 * args.eval_images, rng, split="all")
report = ev.vq_report(vq, images)
row = dict(tag=mine.tag, flags=" ".join(rest), overrides=overrides, vq_steps=args.vq_steps, seconds=round(seconds, 1),
           psnr=round(report["psnr"], 2), usage=round(report["usage"], 3), recon_checker=shapes.score(report["recon"], attrs)["all"])
if args.video:
    clips, _, attrs = shapes.sample_moving_shapes(max(16, args.eval_images // 2), np.random.default_rng([args.seed, 4]))
    report = ev.vq_report(vq, clips, batch_size=32)
    scores = shapes.score(report["recon"], attrs)
    row.update(psnr_clips=round(report["psnr"], 2), recon_checker_clips=scores["all"],
               **{f"clips_{k}": round(scores[k], 3) for k in ("color", "shape", "direction")})
print(json.dumps(row))
with open(Path(__file__).with_name("results_video_vq.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
