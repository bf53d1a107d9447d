"""Export scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, UCI's optdigits) as class folders, the
convention of torchvision's ImageFolder: OUT/<digit>/<index>.png, upsampled to 32x32 grey PNGs.

    pip install scikit-learn        # for this script only; nano_emu does not need it
    python experiments/export_digits.py --out data/digits
    python train_tiny.py --data data/digits --image-size 32 --out out/digits
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="data/digits")
p.add_argument("--size", type=int, default=32, help="pixels per side of the PNGs (bicubic from 8x8)")
args = p.parse_args()
digits = load_digits()
for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):   # pixels: 8x8 floats in 0..16
    image = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L")
    path = Path(args.out) / str(label) / f"{i:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((args.size, args.size), Image.BICUBIC).save(path)
print(f"wrote {len(digits.images)} digits into {args.out}/0 .. {args.out}/9")
