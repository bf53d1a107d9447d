"""The scenes ablation table of docs/scenes.md, read from finished train_tiny.py --world scenes runs: each run's
metrics.json (cfg 2, the default sampling) and its GPT's settings (gpt.safetensors' metadata), one row per run.

    python experiments/scenes_table.py out/scenes out/scenes_wide --label "scenes preset" --label "dim 192 x 6"
"""
import argparse
import json
from pathlib import Path

from nano_emu.checkpoint import read_meta
from nano_emu.scenes import CATEGORIES

p = argparse.ArgumentParser()
p.add_argument("runs", nargs="+", type=Path, help="train_tiny.py --world scenes output folders")
p.add_argument("--label", action="append", default=[], help="a name per run, in order (default: the folder)")
args = p.parse_args()

short = {"single_object": "single", "two_object": "two", "counting": "count", "colors": "colours",
         "position": "position", "color_attr": "col. attr"}
print("| run | GPT | steps | pool | VQ s | GPT s | eval s | overall seen / held-out | "
      + " / ".join(short[c] for c in CATEGORIES) + " (seen) | QA fresh / held-out | captions exact / true |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
for k, run in enumerate(args.runs):
    m = json.loads((run / "metrics.json").read_text())
    s = read_meta(run / "gpt.safetensors")["settings"]
    label = args.label[k] if k < len(args.label) else run.name
    print(f"| {label} | {s['gpt_dim']} x {s['gpt_layers']} | {s['gpt_steps']} | {s['pool']} | {m['vq_s']:.0f} | "
          f"{m['gpt_s']:.0f} | {m['eval_s']:.0f} | {m['adherence_seen_cfg2']:.3f} / {m['adherence_heldout_cfg2']:.3f} | "
          + " / ".join(f"{m[f'{c}_seen_cfg2']:.2f}" for c in CATEGORIES)
          + f" | {m['qa_accuracy_seen']:.1%} / {m['qa_accuracy_heldout']:.1%} | "
          f"{m['caption_exact_seen']:.1%} / {m['caption_accuracy_seen']:.1%} |")
