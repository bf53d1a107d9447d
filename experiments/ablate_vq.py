"""Ablations of the tiny VQ stage: train one configuration, report what train_tiny.py would report.

    python experiments/ablate_vq.py --steps 1400 --batch 8 --lr 2e-3 --set codebook_size=256 --tag lr2e-3

Appends one JSON line per run to experiments/results_vq.jsonl: seconds, PSNR, checker on reconstructions,
codebook usage, measured on the same 512 fresh images (seed 3) that train_tiny.py's evaluation draws.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nano_emu import shapes
from nano_emu import evaluate as ev
from nano_emu.train import Distributed, batch_rng, init_vq_for_training, train_vq
from nano_emu.vq import VQConfig, VQModel
from nano_emu.image import to_tensor

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=700)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--set", action="append", default=[], help="VQConfig.tiny override, e.g. codebook_size=256")
p.add_argument("--tag", default="")
p.add_argument("--save", default=None, help="keep the trained VQ here (a .safetensors checkpoint)")
args = p.parse_args()

overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
cfg = VQConfig.tiny(**overrides)
torch.manual_seed(args.seed)
vq = VQModel(cfg)
init_vq_for_training(vq)
start = time.time()
with tempfile.TemporaryDirectory() as tmp:
    path = Path(args.save) if args.save else Path(tmp) / "vq.safetensors"
    train_vq(vq, lambda step: to_tensor(shapes.sample_shapes(args.batch, batch_rng(args.seed, 0, step))[0]),
             args.steps, args.lr, path, {"kind": "vq", "config": vars(cfg)}, Distributed(), ckpt_every=10**9)
seconds = time.time() - start
images, _, attrs = shapes.sample_shapes(512, np.random.default_rng([args.seed, 3]), split="all")
report = ev.vq_report(vq.eval(), images)
row = dict(tag=args.tag, steps=args.steps, batch=args.batch, lr=args.lr, overrides=overrides,
           seconds=round(seconds, 1), psnr=round(report["psnr"], 2), usage=round(report["usage"], 3),
           recon_checker=shapes.score(report["recon"], attrs)["all"])
print(json.dumps(row))
with open(Path(__file__).with_name("results_vq.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
