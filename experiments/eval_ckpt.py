"""Re-evaluate a finished train_tiny.py run without retraining: the same evaluate.py the run used, with another
sampling temperature, into a separate folder; prints the headline numbers and the evaluation's seconds. The world
(shapes or scenes) is the one the checkpoint was trained on; --repeats defaults to that world's preset.

    python experiments/eval_ckpt.py out/tiny --temperature 0.5 --out out/eval_t05
    python experiments/eval_ckpt.py out/scenes --temperature 0.5 --out out/scenes_t05
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from nano_emu import evaluate as ev
from nano_emu.checkpoint import SETTINGS_KEY, read_meta
from nano_emu.scenes import CATEGORIES
from nano_emu.tiny import load_tiny
from nano_emu.world import Scenes, Shapes

p = argparse.ArgumentParser()
p.add_argument("ckpt")
p.add_argument("--out", required=True)
p.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's own")
p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's --seed, as it evaluated)")
p.add_argument("--repeats", type=int, default=None, help="draws per prompt (default: the world's preset, 7 or 9)")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
pipe = load_tiny(args.ckpt)
if args.temperature is not None:
    pipe.sampling = dataclasses.replace(pipe.sampling, temperature=args.temperature)
meta = read_meta(Path(args.ckpt) / "gpt.safetensors")
scenes = meta.get("world") == "scenes"
seed = args.seed if args.seed is not None else meta.get(SETTINGS_KEY, {}).get("seed", 0)
world = Scenes() if scenes else Shapes()
start = time.perf_counter()
with torch.no_grad():
    metrics = ev.evaluate(pipe, world, out, seed=seed, n=256, columns=6,
                          repeats=args.repeats or (9 if scenes else 7))
metrics["eval_s"] = round(time.perf_counter() - start, 1)
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
if scenes:
    keys = ["adherence_seen_cfg2", "adherence_heldout_cfg2", "qa_accuracy_seen", "qa_accuracy_heldout",
            "caption_exact_seen"] + [f"{c}_seen_cfg2" for c in CATEGORIES]
else:
    keys = ["vq_psnr_db", "adherence_seen_cfg2", "adherence_heldout_cfg2", "caption_accuracy_seen",
            "caption_accuracy_heldout", "square_fill_seen_cfg2", "circle_fill_seen_cfg2", "triangle_fill_seen_cfg2"]
for k in keys + ["eval_s"]:
    print(f"{k:34} {metrics.get(k)}")
