"""Draw images from text, or answer questions about an image, with a tiny checkpoint or the released Emu3 weights.

    python sample.py --ckpt out/tiny --prompt "a red circle in the top left" --cfg 3 --seed 0 --out x.png
    python sample.py --ckpt out/tiny --prompt "a red circle in the top left" --prompt "a blue square in the center" \\
                     --n 4 --out grid.png --progress fill.gif       # a grid, and a GIF of it filling in row by row
    python sample.py --ckpt out/tiny --caption some_shape.png       # image -> text
    python sample.py --ckpt out/video --prompt "a red circle moving left" --frames 8 --out clip.gif   # text -> clip
    python sample.py --ckpt out/video --caption clip.gif            # clip -> text (a GIF or a folder of frames)
    python sample.py --weights BAAI/Emu3-Gen --vq BAAI/Emu3-VisionTokenizer --prompt "a cat" --ratio 16:9 \\
                     --device cuda --dtype bfloat16 --out cat.png   # the released model (folders you downloaded)
    python sample.py --weights BAAI/Emu3-Chat --vq BAAI/Emu3-VisionTokenizer --image cat.png --question "What is it?"
    python sample.py --llamagen c2i_B_256.pt --vq vq_ds16_c2i.pt --class 207 --class "red panda" --n 8 --out grid.png
    python sample.py --chameleon chameleon-7b --image cat.png --question "What animal is this?"   # understanding
    python sample.py --chameleon Anole-7b-v0.1-hf --prompt "a watercolor fox" --out fox.png   # Anole draws
    python sample.py --ckpt out/tiny --prompt "a red circle in the top left" --cdk-k 8 --out cdk.png   # CM3Leon's CD-K
    python sample.py --ckpt out/tiny --complete shape.png --keep-rows 3 --n 4 --out completed.png  # image completion
    python sample.py --ckpt out/tiny --adapter out/ft/adapter --prompt "3" --out 3.png    # a fine-tune's LoRA (finetune.py)
"""

import sys
import time
from pathlib import Path

from PIL import Image

from nano_emu import cli
from nano_emu.image import load_clip, save_image
from nano_emu.pipeline import Pipeline
from nano_emu.release import apply_adapter
from nano_emu.vq import VQConfig

TEMPORAL_FACTOR = VQConfig.emu3().temporal_factor   # frames per code frame: 4 in the released VQ and the tiny one


class StatusLine:
    """The progress line shown while drawing, rewritten in place (\r) on stderr. end() moves below it, so what is
    printed next -- the summary, an error, a traceback -- starts a line of its own."""

    def __init__(self):
        self.open = False

    def show(self, text: str) -> None:
        print(f"\r{text}", end="", file=sys.stderr, flush=True)
        self.open = True

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


STATUS = StatusLine()


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
    cfg = pipe.guidance.cfg_scale if args.cfg is None else args.cfg
    sampling = dict(ratio=args.ratio, cfg_scale=cfg, seed=args.seed, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, cdk_k=args.cdk_k)
    if args.negative is not None:
        sampling["negative_prompt"] = args.negative
    if args.frames:
        sampling["frames"] = args.frames
    what = f"clip(s) of {args.frames} frames, {pipe.code_frames(args.frames)}x" if args.frames else "image(s) of "
    print(f"drawing {len(prompts)} {what}{h}x{w} codes ({h * pipe.vq.cfg.spatial_factor}x"
          f"{w * pipe.vq.cfg.spatial_factor} px), cfg {cfg}, seed {args.seed}")
    frames, start = [], time.time()
    for rows in pipe.draw_stream(prompts, **sampling):
        n_tokens = rows.tokens.size(1)
        elapsed = time.time() - start
        eta = elapsed / rows.rows_done * (rows.rows_total - rows.rows_done)
        STATUS.show(f"  row {rows.rows_done:4d}/{rows.rows_total}  {n_tokens * len(prompts) / elapsed:8.1f} "
                    f"tokens/s  ETA {eta:6.1f}s")
        if args.progress:   # the finished rows on a black canvas
            frames.append(grid_image(pipe.preview(rows, h, w), args.n))
    elapsed = time.time() - start
    STATUS.end()
    print(f"  {n_tokens} tokens per image in {elapsed:.1f}s: {n_tokens * len(prompts) / elapsed:.1f} tokens/s "
          f"({'CFG: 2 rows per image, ' if cfg != 1 else ''}batch {len(prompts)})")
    for prompt, plan in zip(prompts, rows.plans or []):   # a model trained with --plan wrote these first
        print(f"  plan for {prompt!r}: {plan}")
    images = pipe.decode(rows.codes, args.frames)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.frames:
        write_clips(images, args, out)
        return
    save_image(images[0] if len(images) == 1 else grid_image(images, args.n), out)
    print(f"wrote {out}" + ("" if len(images) == 1 else f" ({len(args.prompt)} prompts x {args.n}, one row each)"))
    if args.progress:
        frames += [frames[-1]] * 4   # hold the finished image for a moment
        save_image(frames[0], args.progress, save_all=True, append_images=frames[1:], duration=120, loop=0)
        print(f"wrote {args.progress} ({len(frames)} frames)")


def write_clips(clips: list[list[Image.Image]], args, out: Path) -> None:
    """A .gif plays the clips side by side (one row per prompt); any other format is a still: a row of frames
    per clip."""
    if out.suffix.lower() == ".gif":
        frames = [grid_image([clip[k] for clip in clips], args.n) for k in range(len(clips[0]))]
        save_image(frames[0], out, save_all=True, append_images=frames[1:], duration=150, loop=0)
        print(f"wrote {out} ({len(frames)} frames" + ("" if len(clips) == 1 else
              f"; {len(args.prompt)} prompts x {args.n}, one row each") + ")")
    else:
        save_image(grid_image([frame for clip in clips for frame in clip], len(clips[0])), out)
        print(f"wrote {out} ({len(clips)} clip(s), one row of {len(clips[0])} frames each)")


def complete(pipe: Pipeline, args) -> None:
    """Keep the first --keep-rows rows of codes of --complete and draw the rest, --n times per prompt (or with the
    empty caption), in one grid."""
    prompts = [p for p in (args.prompt or [""]) for _ in range(args.n)]
    start = time.time()
    images = pipe.complete(args.complete, args.keep_rows, prompts, seed=args.seed, cfg_scale=args.cfg,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cdk_k=args.cdk_k)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid_image(images, args.n), out)
    print(f"wrote {out}: {len(images)} completion(s) of {args.complete} from its first {args.keep_rows} rows "
          f"({time.time() - start:.1f}s)")


def answer(pipe: Pipeline, args) -> None:
    image = args.caption or args.image
    start = time.time()
    if args.caption and len(load_clip(args.caption)) > 1:   # an animated GIF or a folder of frames: a clip
        text = pipe.answer_clip(args.caption, args.question, max_new_tokens=args.max_new_tokens)
    else:
        text = pipe.answer(image, args.question, max_new_tokens=args.max_new_tokens)
    print(f"{image}: {text}\n({time.time() - start:.1f}s)")


def draw_classes(args) -> None:
    """LlamaGen: a grid with one row of --n images per --class, each row labelled with its ImageNet class name; one
    image (one --class, --n 1) is written bare."""
    from PIL import ImageDraw

    pipe = cli.load_pipeline(args)
    if args.adapter:
        apply_adapter(pipe, "llamagen", args.llamagen, args.adapter)
    pipe.compile, pipe.sjd, pipe.sjd_coupled = args.compile, args.sjd, args.coupled
    classes = [c for c in args.classes for _ in range(args.n)]
    h, w = pipe.grid()
    cfg = pipe.guidance.cfg_scale if args.cfg is None else args.cfg
    start = time.time()
    for rows in pipe.draw_stream(classes, cfg_scale=cfg, seed=args.seed, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, cfg_interval=args.cfg_interval):
        STATUS.show(f"  row {rows.rows_done:4d}/{rows.rows_total}")
    sampled = time.time() - start
    STATUS.end()
    images = pipe.decode(rows.codes)
    print(f"  {len(classes)} image(s) of {h}x{w} tokens in {sampled:.1f}s (GPT, CFG {cfg}) + "
          f"{time.time() - start - sampled:.1f}s (VQ decode)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def label(name: str) -> str:   # "207: golden retriever"
        token = pipe.tokenizer.encode(name)
        return f"{token[0] - pipe.tokenizer.first_class_id}: {pipe.tokenizer.decode(token)}"

    if len(images) == 1:
        save_image(images[0], out)
        print(f"wrote {out} (class {label(args.classes[0])})")
        return
    grid = grid_image(images, args.n)
    strip = 14   # a label strip above every row
    canvas = Image.new("RGB", (grid.width, grid.height + strip * len(args.classes)), "white")
    draw, side = ImageDraw.Draw(canvas), images[0].height
    for row, name in enumerate(args.classes):
        canvas.paste(grid.crop((0, row * side, grid.width, (row + 1) * side)), (0, row * (side + strip) + strip))
        draw.text((2, row * (side + strip) + 1), label(name), fill="black")
    save_image(canvas, out)
    print(f"wrote {out} ({len(args.classes)} classes x {args.n})")


def main(args):
    for path in (args.out, args.progress):   # what a write killed mid-way left (image.save_image's .tmp)
        stale = Path(f"{path}.tmp") if path else None
        if stale is not None and stale.is_file():
            stale.unlink()
            print(f"note: removed {stale}, left by a write that was killed before it finished")
    if args.llamagen:   # LlamaGen's class-to-image weights
        return draw_classes(args)
    pipe = cli.load_pipeline(args)
    if args.adapter:   # a fine-tune's LoRA (finetune.py), merged into the base it was trained on
        family, base = ("tiny", args.ckpt) if args.ckpt else ("chameleon", args.chameleon) if args.chameleon \
            else ("emu3", args.weights)
        apply_adapter(pipe, family, base, args.adapter)
    pipe.compile, pipe.sjd, pipe.sjd_coupled = args.compile, args.sjd, args.coupled
    if args.complete:
        complete(pipe, args)
    elif args.prompt:
        draw(pipe, args)
    if args.caption or args.image:
        answer(pipe, args)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[1], usage="%(prog)s MODEL WHAT [options]")
    source = p.add_argument_group("MODEL: one of")
    source.add_argument("--ckpt", type=cli.existing_folder, metavar="DIR", help="a train_tiny.py output folder")
    source.add_argument("--weights", type=cli.hub_folder, metavar="DIR", help="Emu3-Gen / -Chat (original or -hf)")
    source.add_argument("--vq", type=cli.hub_path, help="Emu3-VisionTokenizer (original layout); LlamaGen's VQ")
    source.add_argument("--llamagen", type=cli.hub_file, metavar="FILE", help="a LlamaGen c2i GPT (.pt, .safetensors)")
    source.add_argument("--chameleon", type=cli.hub_folder, metavar="DIR", help="a Chameleon or Anole folder")
    source.add_argument("--adapter", type=cli.existing_folder, default=None, metavar="DIR",
                        help="with one of those: a LoRA adapter finetune.py wrote for it")
    gen = p.add_argument_group("WHAT: text -> image")
    gen.add_argument("--prompt", action="append", default=[], help="caption to draw (repeat for rows)")
    gen.add_argument("--n", type=cli.at_least(1), default=1, help="images per prompt (a grid row each)")
    gen.add_argument("--negative", default=None, help="negative prompt (default: the model's)")
    # g = 1 is unguided; g < 1 weakens the prompt, g = 0 ignores it (draws the negative prompt), g < 0 steers away
    gen.add_argument("--cfg", type=cli.cfg_scale, default=None, help="guidance scale, 1 = off (default: the model's)")
    gen.add_argument("--frames", type=cli.checked(int, lambda n: n > 0 and n % TEMPORAL_FACTOR == 0,
                                                  f"a positive multiple of {TEMPORAL_FACTOR} (the VQ's temporal "
                                                  f"factor: {TEMPORAL_FACTOR} frames per code frame)"),
                     default=None, help="draw a clip of this many frames (a --video run)")
    gen.add_argument("--ratio", type=cli.ratio, default="1:1", help="width:height (the area is the model's)")
    gen.add_argument("--temperature", type=cli.temperature, default=None, metavar="T", help="0 = greedy")
    gen.add_argument("--top-k", type=cli.top_k, default=None, metavar="K", help="(default: the model's)")
    gen.add_argument("--top-p", type=cli.top_p, default=None, metavar="P", help="nucleus sampling (default: off)")
    # torch.Generator takes any seed in [0, 2**64)
    gen.add_argument("--seed", type=cli.checked(int, lambda s: 0 <= s < 2**64, "in [0, 2**64)"), default=0)
    gen.add_argument("--out", type=cli.output_file(cli.image_suffixes(), "an image format PIL writes (.png, .jpg)",
                                                   probe=cli.writes_rgb),
                     default="sample.png", help="image (.png, .jpg; .gif for a clip)")
    gen.add_argument("--progress", type=cli.output_file({".gif"}, "a GIF (.gif)"), default=None, metavar="GIF",
                     help="also a GIF of the image filling in row by row")
    gen.add_argument("--class", dest="classes", action="append", default=[], help="LlamaGen: ImageNet class, "
                     "e.g. 207 or 'golden retriever'")
    gen.add_argument("--gpt-model", default=None, help="LlamaGen: GPT-B | -L | -XL | -XXL | -3B (default: read off)")
    gen.add_argument("--image-size", type=cli.at_least(1), default=None, help="LlamaGen 256 | 384, Chameleon 512")
    gen.add_argument("--cfg-interval", type=cli.at_least(-1), default=None, metavar="N",
                     help="LlamaGen: guide the first N + 2 tokens only")
    gen.add_argument("--tokenizer-dir", type=cli.existing_folder, default=None, metavar="DIR",
                     help="Chameleon's original tokenizer/ folder")
    gen.add_argument("--cdk-k", type=cli.cdk_k, default=None, metavar="K",
                     help="CM3Leon's contrastive decoding (top-K) instead of CFG")
    gen.add_argument("--complete", type=cli.image_file, default=None, metavar="IMAGE",
                     help="complete an image: keep its first --keep-rows rows")
    gen.add_argument("--keep-rows", type=cli.at_least(0), default=None, metavar="N", help="rows of codes kept")
    und = p.add_argument_group("WHAT: image -> text")
    und.add_argument("--caption", type=cli.image_or_clip, metavar="IMAGE", help="an image, GIF or frames folder")
    und.add_argument("--image", type=cli.image_file, help="an image to ask about (with --question)")
    und.add_argument("--question", default="", help="a question about --image")
    und.add_argument("--max-new-tokens", type=cli.at_least(1), default=256, metavar="N")
    speed = p.add_argument_group("speed (same results, fewer seconds)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    speed.add_argument("--sjd", type=cli.checked(int, lambda n: n == 0 or n >= 2, "0 (off) or a window >= 2"),
                       nargs="?", const=16, default=0, metavar="WINDOW",
                       help="speculative Jacobi decoding (16 if no WINDOW)")
    speed.add_argument("--coupled", action="store_true", help="with --sjd: coupled redraws (MC-SJD)")
    speed.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda[:N] | mps")
    speed.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="the GPT's (auto: float32 tiny, bf16 released)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.llamagen:
        if not args.vq or not args.classes:
            p.error("--llamagen needs --vq (its VQ, e.g. vq_ds16_c2i.pt) and at least one --class")
        return args
    if sum(map(bool, (args.ckpt, args.weights, args.chameleon))) != 1:
        p.error("give one of --ckpt (a train_tiny.py output folder), --weights (released Emu3 weights) or "
                "--chameleon (a Chameleon / Anole folder)")
    if args.vq and not args.weights:
        p.error("--vq goes with --weights or --llamagen (the released VQ of an original-layout Emu3 folder)")
    if args.progress and Path(args.progress).resolve() == Path(args.out).resolve():
        p.error(f"--progress and --out name the same file {args.out}: the GIF would replace the image; give "
                f"--progress a name of its own")
    if args.frames and args.progress:
        p.error("--progress shows an image filling in row by row; it is not available with --frames")
    if args.frames and args.complete:
        p.error("--complete keeps rows of an image; it is not available with --frames")
    if args.tokenizer_dir and not args.chameleon:
        p.error("--tokenizer-dir goes with --chameleon (its original layout)")
    if args.coupled and not args.sjd:
        p.error("--coupled changes how --sjd redraws; give --sjd [WINDOW] with it")
    if (args.complete is None) != (args.keep_rows is None):
        p.error("--complete and --keep-rows go together (the image, and how many of its rows of codes to keep)")
    if not args.prompt and not (args.caption or args.image or args.complete):
        p.error("nothing to do: give --prompt (text -> image), --caption / --image (image -> text) or --complete")
    return args


# What the library raises for bad input that only shows once the model is there: a checkpoint folder that lacks
# a file or holds a corrupt one, files of two runs, an image too small for the VQ, a prompt longer than the context,
# more images at once than memory holds; and what the system refuses (OSError: a full disk, no permission). Any
# other error is a bug and keeps its traceback. (A bug that raises ValueError is printed as one line too; main()
# itself lets everything through, so the tests and `python -c "import sample; ..."` still see the traceback.)
USER_INPUT_ERRORS = (OSError, ValueError)

if __name__ == "__main__":
    arguments = parse_args()
    try:
        try:
            main(arguments)
        finally:
            STATUS.end()   # an error or a traceback starts below the progress line
    except USER_INPUT_ERRORS as e:
        build_parser().error(str(e))
