"""How crisp are drawn shapes? The fraction of its bounding box each drawn shape fills, against the rendered world's.

    python experiments/fill_histogram.py --ckpt out/tiny --out docs/img/fill.png
    python experiments/fill_histogram.py --ckpt out/tiny --temperature 0.5 1.0 --results experiments/results_fill.jsonl

A rendered square fills all of its box, a circle ~pi/4, a triangle ~1/2 (shapes.fill); a square drawn with rounded
corners fills less and reads as a circle to any stricter reader than the project's checker. Draws --per-triple
images per seen (colour, shape, position) with seed 1000+ (train_tiny.py's evaluation uses seed 0), at each
--temperature with the checkpoint's CFG, prints the share of each shape inside shapes.FILL_RANGES, and with --out
draws evaluate.fill_histogram's picture of the first temperature's drawings against as many rendered images. The
first row is the VQ's own reconstructions of as many rendered images (seed 3): how crisp the decoder is when the
codes are a real image's, so that a drawing's rounded corners can be laid at the decoder's door or at the GPT's.
"""
import argparse
import json
import time

import numpy as np
import torch

from nano_emu import shapes
from nano_emu import evaluate as ev
from nano_emu.tiny import load_tiny
from nano_emu.image import from_tensor, to_tensor

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--ckpt", default="out/tiny", help="a train_tiny.py output folder")
p.add_argument("--per-triple", type=int, default=2, help="images per seen (colour, shape, position)")
p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
p.add_argument("--out", help="write the histogram picture here (PNG)")
p.add_argument("--results", help="append one JSON row per temperature to this file")
args = p.parse_args()

pipe = load_tiny(args.ckpt)
attrs = [t for t in shapes.TRAIN_TRIPLES for _ in range(args.per_triple)]
shapes = [t[1] for t in attrs]
rendered, _, rendered_attrs = shapes.sample_shapes(len(attrs), np.random.default_rng(3))
with torch.no_grad():
    recon = from_tensor(pipe.vq.decode(pipe.vq.encode(to_tensor(rendered))))
print(json.dumps(dict(ckpt=args.ckpt, reconstructions=len(recon), **{
    k: round(v, 4) for k, v in shapes.fill_in_range(recon, [t[1] for t in rendered_attrs]).items()})), flush=True)
drawn_by_t = {}
for temperature in args.temperature:
    start = time.perf_counter()
    images = ev.draw(pipe, [shapes.caption(*t) for t in attrs], temperature=temperature, seed=1000)
    drawn_by_t[temperature] = images
    row = dict(ckpt=args.ckpt, temperature=temperature, cfg=pipe.guidance.cfg_scale, n=len(attrs),
               seconds=round(time.perf_counter() - start, 1),
               adherence=round(shapes.score(images, attrs)["all"], 4),
               **{k: round(v, 4) for k, v in shapes.fill_in_range(images, shapes).items()})
    print(json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
if args.out:   # the same picture the evaluation writes as fill.png, of the first temperature's drawings
    ev.fill_histogram(drawn_by_t[args.temperature[0]], shapes, args.out, 1000, pipe.guidance.cfg_scale)
    print(f"wrote {args.out}")
