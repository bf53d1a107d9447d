"""Re-evaluate a finished train_tiny.py run without retraining: the same evaluate.py the run used, with another
sampling temperature, into a separate folder; prints the speedrun table's numbers and the evaluation's seconds.

    python experiments/eval_ckpt.py out/tiny --temperature 0.5 --out out/eval_t05
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from nano_emu import evaluate as ev
from nano_emu.tiny import load_tiny
from nano_emu.world import Shapes

p = argparse.ArgumentParser()
p.add_argument("ckpt")
p.add_argument("--out", required=True)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
pipe = load_tiny(args.ckpt)
pipe.sampling = dataclasses.replace(pipe.sampling, temperature=args.temperature)
start = time.perf_counter()
with torch.no_grad():
    metrics = ev.evaluate(pipe, Shapes(), out, seed=args.seed, n=256, columns=6, repeats=7)
metrics["eval_s"] = round(time.perf_counter() - start, 1)
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
for k in ("vq_psnr_db", "adherence_seen_cfg2", "adherence_heldout_cfg2", "caption_accuracy_seen",
          "caption_accuracy_heldout", "square_fill_seen_cfg2", "circle_fill_seen_cfg2", "triangle_fill_seen_cfg2",
          "eval_s"):
    print(f"{k:34} {metrics.get(k)}")
