"""Choose the tiny model's sampling defaults on a VALIDATION draw (issue 9), never on the test numbers.

    python experiments/sweep_sampling.py --ckpt out/tiny

Draws `--per-triple` images per seen (colour, shape, position) triple and per held-out triple with seeds
1000+ (train_tiny.py's reported evaluation uses seed 0 and the same prompts: these draws never enter it), for
every CFG scale x temperature, and prints the checker's adherence as a markdown table.
"""
import argparse
import itertools
import json

import numpy as np

from nano_emu import data
from nano_emu import evaluate as ev
from nano_emu.pipeline import load_tiny

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default="out/tiny")
p.add_argument("--per-triple", type=int, default=2)
p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
p.add_argument("--temperature", type=float, nargs="+", default=[0.5, 0.7, 1.0])
p.add_argument("--top-k", type=int, nargs="+", default=[0], help="0 = off")
args = p.parse_args()

pipe = load_tiny(args.ckpt)
rows = []
for split, triples, reps in (("seen", data.TRAIN_TRIPLES, args.per_triple),
                             ("held-out", data.HELDOUT, 8 * args.per_triple)):
    attrs = [t for t in triples for _ in range(reps)]
    captions = [data.caption(*t) for t in attrs]
    for cfg, temperature, top_k in itertools.product(args.cfg, args.temperature, args.top_k):
        images = ev.draw(pipe, captions, cfg_scale=cfg, temperature=temperature, top_k=top_k or None, seed=1000)
        rows.append(dict(split=split, cfg=cfg, temperature=temperature, top_k=top_k,
                         adherence=round(ev.adherence(images, attrs), 3), n=len(attrs)))
        print(json.dumps(rows[-1]), flush=True)

temps = args.temperature
for split in ("seen", "held-out"):
    for top_k in args.top_k:
        print(f"\n{split}, top-k {top_k or 'off'}: adherence by CFG scale (rows) and temperature (columns)\n")
        print("| cfg | " + " | ".join(f"T {t:g}" for t in temps) + " |\n|---|" + "---:|" * len(temps))
        for cfg in args.cfg:
            cells = [next(r["adherence"] for r in rows if (r["split"], r["cfg"], r["temperature"], r["top_k"]) ==
                          (split, cfg, t, top_k)) for t in temps]
            print(f"| {cfg:g} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
