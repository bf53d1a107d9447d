"""Choose the tiny model's sampling defaults on a VALIDATION draw, never on the test numbers.

    python experiments/sweep_sampling.py --ckpt out/tiny

Draws `--per-triple` images per seen (colour, shape, position) triple and per held-out triple with seeds
1000+ (train_tiny.py's reported evaluation uses seed 0 and the same prompts: these draws never enter it), for
every CFG scale x temperature, and prints the checker's adherence as a markdown table. With --clips (a --video
checkpoint) it draws `--per-triple` 8-frame clips per (colour, shape, direction) instead, read back the same way.
A scenes checkpoint (--world scenes) is swept on 12 other prompts per category than the evaluation's (picked with
another seed, seen and held-out), `--per-triple` x 4 draws each, scored GenEval-style (the categories' mean):

    python experiments/sweep_sampling.py --ckpt out/scenes --cfg 2 3 4 --temperature 1
"""
import argparse
import itertools
import json

import numpy as np

from nano_emu import scenes, shapes
from nano_emu import evaluate as ev
from nano_emu.checkpoint import read_meta
from nano_emu.tiny import load_tiny
from nano_emu.world import Scenes

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default="out/tiny")
p.add_argument("--per-triple", type=int, default=2)
p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
p.add_argument("--temperature", type=float, nargs="+", default=[0.5, 0.7, 1.0])
p.add_argument("--top-k", type=int, nargs="+", default=[0], help="0 = off")
p.add_argument("--clips", action="store_true", help="draw clips (caption -> 8 frames) instead of images")
args = p.parse_args()

pipe = load_tiny(args.ckpt)
rows = []
clip_triples = tuple(itertools.product(shapes.COLORS, shapes.SHAPES, shapes.DIRECTIONS))
world = read_meta(f"{args.ckpt}/gpt.safetensors").get("world")
rng = np.random.default_rng(777)   # not the evaluation's 12345: other prompts of each category
splits = ((("clips", clip_triples, args.per_triple),) if args.clips else
          tuple((split, [p for c in scenes.CATEGORIES for p in Scenes._some(scenes.prompts(name, c), rng)],
                 4 * args.per_triple) for split, name in (("seen", "train"), ("held-out", "heldout")))
          if world == "scenes" else
          (("seen", shapes.TRAIN_TRIPLES, args.per_triple), ("held-out", shapes.HELDOUT, 8 * args.per_triple)))
for split, triples, reps in splits:
    attrs = [t for t in triples for _ in range(reps)]
    captions = ([scenes.caption(p) for p in attrs] if world == "scenes" else
                [(shapes.video_caption if args.clips else shapes.caption)(*t) for t in attrs])
    draw = (lambda *a, **k: ev.draw(*a, frames=shapes.VIDEO_FRAMES, **k)) if args.clips else ev.draw
    for cfg, temperature, top_k in itertools.product(args.cfg, args.temperature, args.top_k):
        images = draw(pipe, captions, cfg_scale=cfg, temperature=temperature, top_k=top_k or None, seed=1000)
        rows.append(dict(split=split, cfg=cfg, temperature=temperature, top_k=top_k,
                         adherence=round(scenes.geneval(images, attrs)["overall"] if world == "scenes" else
                                         shapes.score(images, attrs)["all"], 3), n=len(attrs)))
        print(json.dumps(rows[-1]), flush=True)

temps = args.temperature
for split, _, _ in splits:
    for top_k in args.top_k:
        print(f"\n{split}, top-k {top_k or 'off'}: adherence by CFG scale (rows) and temperature (columns)\n")
        print("| cfg | " + " | ".join(f"T {t:g}" for t in temps) + " |\n|---|" + "---:|" * len(temps))
        for cfg in args.cfg:
            cells = [next(r["adherence"] for r in rows if (r["split"], r["cfg"], r["temperature"], r["top_k"]) ==
                          (split, cfg, t, top_k)) for t in temps]
            print(f"| {cfg:g} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
