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

import argparse
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from nano_emu import cli, recipe
from nano_emu.checkpoint import FolderInUse, RunMismatch, output_lock
from nano_emu.folder import BACKGROUNDS, FolderError
from nano_emu.recipe import PRESETS, SAMPLING, UsageError


def main(args):
    args.out = Path(args.out)
    # one run per --out (rank 0 holds it for all ranks): a second is refused, naming this one's pid
    with output_lock(args.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return recipe.train(args)


def parse_args(argv=None):
    count, rate = cli.at_least(1), cli.above(0)   # steps, sizes and learning rates are all positive
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=cli.output_folder, default="out/tiny",
                   help="output folder (checkpoints, metrics, pictures)")
    p.add_argument("--preset", default=None, choices=[k for k in PRESETS if k != "quick"],
                   help="model sizes and step counts: tiny = ~8 min on 2 CPU cores (the default); scenes = the "
                        "default with --world scenes, ~20 min; small = for a GPU")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute (CI): tiny models, few steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--change", action="append", default=[], type=lambda flag: flag.removeprefix("--").replace("-", "_"),
                   metavar="FLAG", help="with --resume: a flag that may differ from the run's (e.g. gpt-steps)")
    p.add_argument("--video", action="store_true", help="also train on 8-frame moving-shapes clips")
    p.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype for training (float32 = no autocast)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the GPT's training step (on 2 CPU cores 1.18x per step after ~25 s of "
                        "compiling; needs a C++ compiler on a CPU); the VQ stays eager (compiled it was slower)")
    p.add_argument("--seed", type=cli.at_least(0), default=0)
    p.add_argument("--cfg", type=cli.above(0), default=None,
                   help="CFG scale for evaluation and sample grids (compared with cfg 1 = no guidance); "
                        f"saved in the checkpoint as its default (default: {SAMPLING['shapes']['cfg']:g})")
    p.add_argument("--temperature", type=cli.at_least(0, float), default=None,
                   help=f"sampling temperature for evaluation and sample grids; saved as the checkpoint's default "
                        f"(default: {SAMPLING['shapes']['temperature']:g} for the shapes world, "
                        f"{SAMPLING['scenes']['temperature']:g} otherwise)")
    p.add_argument("--top-k", type=count, default=None, help="top-k for evaluation and sample grids (default: off)")
    p.add_argument("--ckpt-every", type=count, default=250, help="checkpoint interval, in steps")
    for name, kind, text in [("vq-steps", count, "VQ training steps"), ("vq-batch", count, "VQ batch size"),
                             ("vq-lr", rate, "VQ learning rate"),
                             ("vq-width", count, "VQ code width (embed_dim)"),
                             ("pool", count, "images encoded for GPT training"),
                             ("gpt-steps", count, "GPT training steps"), ("gpt-batch", count, "GPT batch size"),
                             ("gpt-lr", rate, "GPT learning rate"), ("gpt-dim", count, "GPT width"),
                             ("gpt-layers", count, "GPT layers"),
                             ("eval-per-triple", count, "generated images per seen (color, shape, position)"),
                             ("eval-images", count, "images for the VQ and captioning metrics"),
                             ("p-drop-caption", cli.at_least(0, float), "probability of an empty caption in a "
                              "generation string"),
                             ("visual-weight", cli.above(0), "loss weight of visual tokens relative to text "
                              "(Emu3: 0.5)"),
                             ("answer-weight", cli.above(0), "loss weight of a caption written for an image")]:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: from the preset)")
    p.add_argument("--tokenizer", choices=["auto", "words", "bytes"], default=None,
                   help="caption tokens: whole words (7 a shapes caption) or UTF-8 bytes (28); auto = words when the "
                        "captions use at most 1024 pieces (default: from the preset)")
    world = p.add_argument_group("what to train on (default: the built-in shapes world)")
    world.add_argument("--world", choices=["shapes", "scenes"], default="shapes",
                       help="a built-in world: shapes (one shape, 90 captions) or scenes (1-4 objects, counts, "
                            "relations and questions, scored like GenEval)")
    world.add_argument("--data", type=cli.existing_folder, default=None, metavar="FOLDER",
                       help="your own images: a captioned folder (metadata.jsonl or metadata.csv with file_name "
                            "and text, as Hugging Face's imagefolder) or class subfolders (as torchvision's "
                            "ImageFolder; the caption is the class name)")
    world.add_argument("--image-size", type=int, choices=[32, 64, 128], default=None,
                       help="with --data: pixels per side (the VQ makes 1/8 as many codes per side; default 64)")
    world.add_argument("--heldout-fraction", type=cli.checked(float, lambda f: 0 < f < 0.5, "in (0, 0.5)"),
                       default=0.1, help="with --data: share of images held out of training, seeded (default 0.1)")
    world.add_argument("--strict", action="store_true",
                       help="with --data: refuse unreadable or truncated images instead of skipping them")
    world.add_argument("--background", choices=sorted(BACKGROUNDS), default="white",
                       help="with --data: what transparency is blended onto (default white)")
    world.add_argument("--caption-column", default="text",
                       help="with --data: the metadata column that holds the caption (default text)")
    share = cli.checked(float, lambda p: 0 <= p < 1, "in [0, 1)")
    video = p.add_argument_group("with --video (defaults: from the preset)")
    video.add_argument("--vq-clip-share", type=cli.checked(float, lambda p: 0 <= p <= 0.5, "in [0, 0.5] (the VQ's "
                                                           "clip batches all come in its second half)"),
                       default=None, help="share of VQ steps on a batch of clips, all after the first half")
    video.add_argument("--vq-clip-batch", type=count, default=None, help="clips in a VQ clip batch (8 frames each)")
    video.add_argument("--clip-pool", type=count, default=None, help="clips encoded for GPT training")
    video.add_argument("--gpt-clip-share", type=share, default=None, help="share of GPT steps on a batch of clips")
    video.add_argument("--eval-clips", type=count, default=None,
                       help="clips drawn for the metrics, cycling through the 72 (color, shape, direction)")
    args = p.parse_args(argv)
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
