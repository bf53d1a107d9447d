"""Look at the scenes world: a grid of fresh training scenes per GenEval category, then held-out ones, each with
its caption, one question and its answer, and the checker's verdict (green: score(strict=True) agrees).

    python experiments/scenes_preview.py --out docs/img/scenes_preview.png
"""
import argparse
import textwrap

import numpy as np
from matplotlib.figure import Figure

from nano_emu import scenes

p = argparse.ArgumentParser()
p.add_argument("--out", default="docs/img/scenes_preview.png")
p.add_argument("--columns", type=int, default=6)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

rng = np.random.default_rng(args.seed)
rows = [("train", c) for c in scenes.CATEGORIES] + [("heldout", c) for c in ("counting", "color_attr", "position")]
fig = Figure(figsize=(1.75 * args.columns + 1.2, 2.45 * len(rows)))
axes = fig.subplots(len(rows), args.columns, squeeze=False)
for (split, category), row in zip(rows, axes):
    images, captions, drawn = scenes.sample_scenes(args.columns, rng, split=split, category=category)
    row[0].set_ylabel(f"{category}\n({split})", fontsize=9)
    for ax, image, text, scene in zip(row, images, captions, drawn):
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        question, answer = scenes.questions(scene, rng, n=1)[0]
        label = "\n".join(textwrap.wrap(text, 24)) + "\n" + "\n".join(textwrap.wrap(f"{question} {answer}", 26))
        ok = scenes.score(image, text, strict=True)
        ax.set_xlabel(label, fontsize=6.5, color="tab:green" if ok else "tab:red")
fig.suptitle("scenes: fresh training scenes per category, then held-out compositions (caption; a question and "
             "its answer)", fontsize=10)
fig.tight_layout(rect=(0, 0, 1, 0.99))
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
