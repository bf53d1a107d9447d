"""Draw images from text, or answer questions about an image, with a tiny checkpoint or the released Emu3 weights.

    python sample.py --ckpt out/tiny --prompt "a red circle in the top left" --cfg 3 --seed 0 --out x.png
    python sample.py --ckpt out/tiny --prompt "a red circle in the top left" --prompt "a blue square in the center" \\
                     --n 4 --out grid.png --progress fill.gif       # a grid, and a GIF of it filling in row by row
    python sample.py --ckpt out/tiny --caption some_shape.png       # image -> text
    python sample.py --weights BAAI/Emu3-Gen --vq BAAI/Emu3-VisionTokenizer --prompt "a cat" --ratio 16:9 \\
                     --device cuda --dtype bfloat16 --out cat.png   # the released model (folders you downloaded)
    python sample.py --weights BAAI/Emu3-Chat --vq BAAI/Emu3-VisionTokenizer --image cat.png --question "What is it?"
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from nano_emu.pipeline import Pipeline, load_tiny, resolve_device


def load(args) -> Pipeline:
    device = resolve_device(args.device)
    if args.ckpt:
        return load_tiny(args.ckpt, device=device, dtype=torch.float32 if args.dtype == "auto" else
                         getattr(torch, args.dtype))
    from nano_emu.emu3 import load_emu3
    # auto: bf16, as Emu3's demos run it (the released checkpoints are fp32: 34 GB)
    dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
    print(f"loading {args.weights}" + (f" + {args.vq}" if args.vq else "") + f" as {dtype} on {device} ...")
    start = time.time()
    pipe = load_emu3(args.weights, vq_path=args.vq, device=device, dtype=dtype)
    print(f"  {pipe.gpt.num_params() / 1e9:.2f}B-parameter GPT loaded in {time.time() - start:.1f}s")
    return pipe


def grid_image(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas


def draw(pipe: Pipeline, args) -> None:
    prompts = [p for p in args.prompt for _ in range(args.n)]
    h, w = pipe.grid(args.ratio)
    cfg = pipe.cfg_scale if args.cfg is None else args.cfg
    sampling = dict(ratio=args.ratio, cfg_scale=cfg, seed=args.seed, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p)
    if args.negative is not None:
        sampling["negative_prompt"] = args.negative
    print(f"drawing {len(prompts)} image(s) of {h}x{w} codes ({h * pipe.vq.cfg.spatial_factor}x"
          f"{w * pipe.vq.cfg.spatial_factor} px), cfg {cfg}, seed {args.seed}")
    frames, start = [], time.time()
    for rows in pipe.draw_stream(prompts, **sampling):
        n_tokens = rows.tokens.size(1)
        elapsed = time.time() - start
        eta = elapsed / rows.rows_done * (rows.rows_total - rows.rows_done)
        print(f"\r  row {rows.rows_done:4d}/{rows.rows_total}  {n_tokens * len(prompts) / elapsed:8.1f} tokens/s  "
              f"ETA {eta:6.1f}s", end="", file=sys.stderr, flush=True)
        if args.progress:   # decode the finished rows and paste them onto a black canvas
            partial = pipe.decode(rows.codes)
            frame = [Image.new("RGB", (w * pipe.vq.cfg.spatial_factor, h * pipe.vq.cfg.spatial_factor))
                     for _ in partial]
            for canvas, image in zip(frame, partial):
                canvas.paste(image, (0, 0))
            frames.append(grid_image(frame, args.n))
    elapsed = time.time() - start
    print(f"\n  {n_tokens} tokens per image in {elapsed:.1f}s: {n_tokens * len(prompts) / elapsed:.1f} tokens/s "
          f"({'CFG: 2 rows per image, ' if cfg != 1 else ''}batch {len(prompts)})")
    images = pipe.decode(rows.codes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else grid_image(images, args.n)).save(out)
    print(f"wrote {out}" + ("" if len(images) == 1 else f" ({len(args.prompt)} prompts x {args.n}, one row each)"))
    if args.progress:
        frames += [frames[-1]] * 4   # hold the finished image for a moment
        frames[0].save(args.progress, save_all=True, append_images=frames[1:], duration=120, loop=0)
        print(f"wrote {args.progress} ({len(frames)} frames)")


def answer(pipe: Pipeline, args) -> None:
    image = args.caption or args.image
    start = time.time()
    text = pipe.answer(image, args.question, max_new_tokens=args.max_new_tokens)
    print(f"{image}: {text}\n({time.time() - start:.1f}s)")


def main(args):
    if bool(args.ckpt) == bool(args.weights):
        raise SystemExit("give either --ckpt (a train_tiny.py output folder) or --weights (released Emu3 weights)")
    if not args.prompt and not (args.caption or args.image):
        raise SystemExit("nothing to do: give --prompt (text -> image) or --caption / --image (image -> text)")
    pipe = load(args)
    pipe.compile, pipe.sjd = args.compile, args.sjd
    if args.prompt:
        draw(pipe, args)
    if args.caption or args.image:
        answer(pipe, args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("model (one of)")
    source.add_argument("--ckpt", help="a train_tiny.py output folder (vq.safetensors + gpt.safetensors)")
    source.add_argument("--weights", help="released Emu3 folder: Emu3-Gen / Emu3-Chat (original or -hf layout)")
    source.add_argument("--vq", help="Emu3-VisionTokenizer folder (not needed for -hf folders, which hold the VQ)")
    gen = p.add_argument_group("text -> image")
    gen.add_argument("--prompt", action="append", default=[], help="caption to draw (repeat for several)")
    gen.add_argument("--n", type=int, default=1, help="images per prompt (one grid row per prompt)")
    gen.add_argument("--negative", default=None, help="negative prompt for CFG (default: the checkpoint's)")
    gen.add_argument("--cfg", type=float, default=None,
                     help="classifier-free guidance scale, 1 = off (default: the checkpoint's; Emu3-Gen: 3.0)")
    gen.add_argument("--ratio", default="1:1", help="aspect ratio width:height (area fixed by the checkpoint)")
    gen.add_argument("--temperature", type=float, default=None, help="(default: the checkpoint's)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens "
                     "(default: the checkpoint's; Emu3-Gen: 2048)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="sample.png", help="output PNG")
    gen.add_argument("--progress", default=None, help="also write a GIF of the image filling in row by row")
    und = p.add_argument_group("image -> text")
    und.add_argument("--caption", help="image to caption (tiny models)")
    und.add_argument("--image", help="image to ask about (Emu3-Chat)")
    und.add_argument("--question", default="", help="question about --image")
    und.add_argument("--max-new-tokens", type=int, default=256)
    speed = p.add_argument_group("speed (same results, fewer seconds)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU; "
                       "the first image pays the compile time)")
    speed.add_argument("--sjd", type=int, nargs="?", const=16, default=0, metavar="WINDOW",
                       help="speculative Jacobi decoding: verify WINDOW drafted tokens per forward (default 16 when "
                            "given; same distribution, fewer forwards)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="GPT weights and activations (auto: float32 for --ckpt, bfloat16 for --weights; "
                        "the VQ stays float32)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
