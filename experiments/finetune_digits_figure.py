"""docs/img/finetune_digits.png: the digits drawn by the base (the shapes run, never fine-tuned), its LoRA and full
fine-tunes and a model trained from scratch on the digits, one row each for the prompts 0-9 (seed 0, each
checkpoint's own sampling defaults); above them held-out digits and the base VQ's reconstructions of them, which
show what a frozen tokenizer trained on six saturated colours can give back.

    python experiments/finetune_digits_figure.py --base /work/runs/ft_base --lora /work/runs/ft_lora \\
        --full /work/runs/ft_full --scratch /work/runs/ft_scratch32 --data /work/runs/digits --out docs/img/finetune_digits.png
"""

import argparse

import numpy as np
from PIL import Image

from nano_emu import evaluate
from nano_emu.folder import Folder
from nano_emu.release import apply_adapter
from nano_emu.tiny import load_tiny

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
for flag in ("base", "lora", "full", "scratch", "data", "out"):
    p.add_argument(f"--{flag}", required=True)
args = p.parse_args()

base = load_tiny(args.base)
heldout = Folder(args.data, image_size=64, log=lambda *a: None)
index = [heldout.split["heldout"][[heldout.captions[i] for i in heldout.split["heldout"]].index(str(d))]
         for d in range(10)]
real = heldout.pixels[index]
rows = {"held-out digits": real, "base VQ's reconstruction": evaluate.vq_report(base.vq, real)["recon"]}
lora = load_tiny(args.base)
apply_adapter(lora, "tiny", args.base, f"{args.lora}/adapter")
prompts = [str(d) for d in range(10)]
for name, pipe in [("base, not fine-tuned", base), ("LoRA fine-tune", lora), ("full fine-tune", load_tiny(
        f"{args.full}/model")), ("from scratch (32 px)", load_tiny(args.scratch))]:
    drawn = [np.asarray(im.resize((64, 64), Image.NEAREST)) for im in pipe.draw(prompts, seed=0)]
    rows[name] = np.stack(drawn)
evaluate.image_grid(np.concatenate(list(rows.values())), list(rows), args.out, columns=10,
                    title="prompts 0-9, seed 0")
print(f"wrote {args.out}")
