"""Train a tiny Emu3 on a CPU: a VQ tokenizer, then ONE GPT that both draws pictures from captions and captions them.

    python train_tiny.py                          # the default: the shapes world on 2 CPU cores, writes out/tiny/
    python train_tiny.py --quick --out out/quick  # a smoke run in about a minute
    python train_tiny.py --data FOLDER --out out/mine   # your own images (captioned or class folders)
    python train_tiny.py --world scenes --out out/scenes  # several objects, counts, relations, questions
    python train_tiny.py --resume                 # continue after a crash or Ctrl-C
    python train_tiny.py --video --out out/video  # also 8-frame clips: caption->clip, clip->caption
    torchrun --nproc_per_node=2 train_tiny.py     # data parallel (gloo on CPU, nccl on CUDA)
    python train_tiny.py --device cuda --preset small   # more compute, bigger models

What it trains on is a world (nano_emu/world.py): the shapes world, scenes, or your folder (nano_emu/folder.py);
the stages never ask which. (1) The VQ learns the world's images -> codes (64x64 -> 8x8); (2) a pool of training
examples is encoded with it; (3) the GPT learns caption->image and image->caption (or question->answer) token
strings (nano_emu/train.py); (4) evaluation through the same Pipeline a user samples with (nano_emu/evaluate.py):
metrics.json, loss curves and sample grids in the output folder. With --video, clips of moving shapes join every
stage (8 frames -> 2 code frames through the causal temporal axis) and the evaluation draws and captions clips.
A folder is read and checked before anything trains: a problem with it is one line and exit code 2.
"""

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from nano_emu import cli, recipe
from nano_emu.checkpoint import FolderInUse, RunMismatch, output_lock
from nano_emu.folder import BACKGROUNDS, FolderError
from nano_emu.recipe import PRESETS, UsageError


def main(args):
    args.out = Path(args.out)
    # one run per --out (rank 0 holds it for all ranks): a second is refused, naming this one's pid
    with output_lock(args.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return recipe.train(args)


def parse_args(argv=None):
    count, rate = cli.at_least(1), cli.above(0)   # steps, sizes and learning rates are all positive
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[1], usage="%(prog)s [options]")
    p.add_argument("--out", type=cli.output_folder, default="out/tiny", help="output folder (default: out/tiny)")
    p.add_argument("--preset", default=None, choices=[k for k in PRESETS if k != "quick"],
                   help="sizes and steps (default: the world's own)")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds: tiny models, few steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--change", action="append", default=[], type=lambda flag: flag.removeprefix("--").replace("-", "_"),
                   metavar="FLAG", help="with --resume: a flag that may differ from the run's")
    p.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the GPT's training step")
    p.add_argument("--seed", type=cli.at_least(0), default=0, help="seeds everything (default 0)")
    p.add_argument("--ckpt-every", type=count, default=250, metavar="N", help="checkpoint every N steps")
    world = p.add_argument_group("what to train on (default: the shapes world)")
    world.add_argument("--world", choices=["shapes", "scenes"], default="shapes",
                       help="one shape, or 1-4 objects scored like GenEval")
    world.add_argument("--video", action="store_true", help="also 8-frame clips of moving shapes")
    world.add_argument("--plan", action="store_true", help="scenes: the layout in words before each picture")
    world.add_argument("--data", type=cli.existing_folder, default=None, metavar="FOLDER",
                       help="your images: captioned or class folders (docs/own_data.md)")
    world.add_argument("--image-size", type=int, choices=[32, 64, 128], default=None, help="--data: pixels per side")
    world.add_argument("--heldout-fraction", type=cli.checked(float, lambda f: 0 < f < 0.5, "in (0, 0.5)"),
                       default=0.1, metavar="F", help="--data: share held out, seeded (default 0.1)")
    world.add_argument("--strict", action="store_true", help="--data: refuse unreadable images, do not skip")
    world.add_argument("--background", choices=sorted(BACKGROUNDS), default="white",
                       help="--data: what transparency is blended onto")
    world.add_argument("--caption-column", default="text", metavar="NAME",
                       help="--data: the metadata column of captions")
    sampling = p.add_argument_group("how the evaluation samples; saved as the checkpoint's default "
                                    "(default: recipe.SAMPLING)")
    sampling.add_argument("--cfg", type=cli.above(0), default=None, help="CFG scale (also drawn without: cfg 1)")
    sampling.add_argument("--temperature", type=cli.at_least(0, float), default=None, metavar="T", help="0: greedy")
    sampling.add_argument("--top-k", type=count, default=None, metavar="K", help="default: off")
    knobs = p.add_argument_group("sizes and steps (default: the preset's, nano_emu/recipe.py)")
    for name, kind, text in [("vq-steps", count, "VQ training steps"), ("vq-batch", count, "VQ batch size"),
                             ("vq-lr", rate, "VQ learning rate"), ("vq-width", count, "VQ code width (embed_dim)"),
                             ("pool", count, "images encoded for the GPT"),
                             ("gpt-steps", count, "GPT training steps"), ("gpt-batch", count, "GPT batch size"),
                             ("gpt-lr", rate, "GPT learning rate"), ("gpt-dim", count, "GPT width"),
                             ("gpt-layers", count, "GPT layers"),
                             ("eval-per-triple", count, "drawings per seen prompt"),
                             ("eval-images", count, "images for the VQ and caption metrics"),
                             ("p-drop-caption", cli.at_least(0, float), "chance of an empty caption (CFG)"),
                             ("visual-weight", cli.above(0), "loss weight of image tokens (Emu3: 0.5)"),
                             ("answer-weight", cli.above(0), "loss weight of a caption of an image")]:
        knobs.add_argument(f"--{name}", type=kind, default=None, metavar="X", help=text)
    knobs.add_argument("--tokenizer", choices=["auto", "words", "bytes"], default=None,
                       help="caption tokens (auto: words if few)")
    share = cli.checked(float, lambda p: 0 <= p < 1, "in [0, 1)")
    video = p.add_argument_group("with --video (default: the preset's)")
    video.add_argument("--vq-clip-share", type=cli.checked(float, lambda p: 0 <= p <= 0.5, "in [0, 0.5] (the VQ's "
                                                           "clip batches all come in its second half)"),
                       default=None, metavar="X", help="share of VQ steps on clips (its second half)")
    video.add_argument("--vq-clip-batch", type=count, default=None, metavar="X", help="clips in a VQ clip batch")
    video.add_argument("--clip-pool", type=count, default=None, metavar="X", help="clips encoded for the GPT")
    video.add_argument("--gpt-clip-share", type=share, default=None, metavar="X", help="share of GPT steps on clips")
    video.add_argument("--eval-clips", type=count, default=None, metavar="X", help="clips drawn for the metrics")
    args = p.parse_args(argv)
    if args.plan and (args.world != "scenes" or args.data is not None):
        p.error("--plan writes each picture's layout in words before it, which only the scenes world knows: "
                "add --world scenes")
    if args.compile and cli.resolve_device(args.device).type == "cpu" and shutil.which(
            os.environ.get("CXX", "c++")) is None:
        p.error("--compile on a CPU needs a C++ compiler (torch.compile writes C++): install g++ or clang++, set CXX "
                "to it, or drop --compile")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    # the user's data or flags, another run holding --out, --resume of another run: one line, exit 2
    except (UsageError, FolderError, FolderInUse, RunMismatch) as e:
        cli.ArgumentParser(prog="train_tiny.py").error(str(e))
