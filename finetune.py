"""Fine-tune a released model on your folder of images: LoRA (default), --full, or --image-head; saved back in the
layout it was released in.

    python finetune.py --ckpt out/tiny --data data/digits --out out/ft_digits          # a tiny run as the "release"
    python finetune.py --weights BAAI/Emu3-Gen-hf --data my_icons --out out/icons --device cuda   # text -> image
    python finetune.py --weights BAAI/Emu3-Chat --vq BAAI/Emu3-VisionTokenizer --data captioned --task answer ...
    python finetune.py --llamagen FoundationVision/LlamaGen/c2i_B_256.pt --vq FoundationVision/LlamaGen/vq_ds16_c2i.pt \\
                       --data class_folders --out out/c2i                               # class folders -> classes
    python finetune.py --chameleon leloy/Anole-7b-v0.1-hf --data my_icons --image-head --out out/anole
    torchrun --nproc_per_node=8 finetune.py --weights BAAI/Emu3-Gen-hf --full --fsdp --checkpointing ...
    python finetune.py ... --plan-only          # the memory plan, then stop
    python finetune.py ... --resume             # continue after a crash or Ctrl-C (same flags)

The folder is either convention train_tiny.py --data reads (a metadata.jsonl/csv of file_name + text, or class
subfolders). It is tokenized once with the release's VQ at the release's image processing and the codes cached in
OUT/codes.safetensors. OUT gets train.safetensors (resumable), adapter/ (LoRA: peft's format; sample.py --adapter),
model/ (the merged model in the released layout: always for --full and --image-head, with --save-merged for LoRA;
it loads as the release does), finetune.json beside each, loss.png, metrics.json and samples.png / captions.png.
"""

import argparse
import os
from contextlib import nullcontext
from pathlib import Path

from nano_emu import cli
from nano_emu.checkpoint import FolderInUse, RunMismatch, output_lock
from nano_emu.finetune import DEFAULT_LR, Options, UsageError, finish, prepare, train
from nano_emu.finetune_data import TASKS
from nano_emu.folder import FolderError
from nano_emu.lora import PROJECTIONS, AdapterMismatch, LoRAConfig


def options_of(args) -> Options:
    family, base = next((f, getattr(args, f)) for f in ("ckpt", "weights", "llamagen", "chameleon")
                        if getattr(args, f))
    family = {"ckpt": "tiny", "weights": "emu3"}.get(family, family)
    mode = "full" if args.full else "image-head" if args.image_head else "lora"
    return Options(
        family=family, base=base, data=args.data, out=args.out, vq=args.vq, mode=mode,
        lora=LoRAConfig(args.rank, args.alpha, args.lora_dropout, tuple(args.targets)), task=args.task,
        question=args.question, p_drop=args.p_drop, steps=args.steps, batch=args.batch,
        lr=args.lr, warmup=min(args.warmup, args.steps), seed=args.seed,
        heldout_fraction=args.heldout_fraction, caption_column=args.caption_column, class_map=args.class_map,
        image_area=args.image_area, image_size=args.image_size, gpt_model=args.gpt_model,
        device=str(cli.resolve_device(args.device)), dtype=args.dtype, fsdp=args.fsdp,
        checkpointing=args.checkpointing, ckpt_every=args.ckpt_every, resume=args.resume, change=args.change,
        save_merged=args.save_merged, samples=args.samples, plan_only=args.plan_only)


def main(args):
    options = options_of(args)
    # one run per --out (rank 0 holds it for all ranks): a second is refused, naming this one's pid
    with output_lock(options.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        job = prepare(options)
        if options.plan_only:
            return job.plan
        history = train(job)
        metrics = finish(job, history)
    if metrics is not None:
        print("\n" + "\n".join(f"{k:28s} {v}" for k, v in metrics.items()))
        print(f"\nwrote {options.out}/: " + " ".join(sorted(p.name for p in Path(options.out).iterdir()
                                                          if not p.name.startswith("."))))
    return metrics


def targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    try:
        LoRAConfig(targets=tuple(names))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def build_parser() -> cli.ArgumentParser:
    count = cli.at_least(1)
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = p.add_argument_group("the base model (one of; as sample.py takes them)")
    base.add_argument("--ckpt", type=cli.existing_folder, help="a train_tiny.py output folder")
    base.add_argument("--weights", type=cli.hub_folder, help="Emu3-Gen / Emu3-Chat (original or -hf layout)")
    base.add_argument("--llamagen", type=cli.hub_file, help="a LlamaGen c2i GPT checkpoint (with --vq)")
    base.add_argument("--chameleon", type=cli.hub_folder, help="a Chameleon / Anole folder (transformers layout)")
    base.add_argument("--vq", type=cli.hub_path, help="Emu3's VisionTokenizer folder (original layout) or "
                      "LlamaGen's VQ file")
    base.add_argument("--image-size", type=count, default=None, help="LlamaGen / Chameleon: pixels per side "
                      "(default: the file name's / 512)")
    base.add_argument("--gpt-model", default=None, help="LlamaGen: GPT-B ... GPT-3B (default: from the shapes)")
    data = p.add_argument_group("the data")
    data.add_argument("--data", type=cli.existing_folder, required=True, metavar="FOLDER",
                      help="captioned (metadata.jsonl / .csv: file_name, text) or class subfolders")
    data.add_argument("--out", type=cli.output_folder, required=True, help="the run's folder")
    data.add_argument("--task", choices=("auto", *TASKS), default="auto",
                      help="draw (text -> image), answer (image -> caption; loss on the answer only) or both; auto: "
                           "answer for an Emu3 Chat base, both for --ckpt, draw otherwise")
    data.add_argument("--question", default="", help="with --task answer: the question the caption answers "
                      "(e.g. 'Describe the image.'; default none)")
    data.add_argument("--p-drop", type=cli.checked(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=None,
                      help="share of drawn strings whose caption is dropped, for CFG (default 0.1)")
    data.add_argument("--class-map", type=cli.existing_file, default=None,
                      help="LlamaGen: JSON {\"folder name\": class index} (default: names are indices or ImageNet "
                           "class names)")
    data.add_argument("--image-area", type=count, default=None,
                      help="pixels per image (default: the release's: Emu3-Gen 720x720, Emu3-Chat 512^2-1024^2)")
    data.add_argument("--heldout-fraction", type=cli.checked(float, lambda f: 0 < f < 0.5, "in (0, 0.5)"),
                      default=0.1, help="share of the folder held out for the metrics (default 0.1)")
    data.add_argument("--caption-column", default="text", help="the metadata column with the caption")
    what = p.add_argument_group("what trains (default: LoRA)")
    what.add_argument("--full", action="store_true", help="every weight (fp32 masters; FSDP for big models)")
    what.add_argument("--image-head", action="store_true",
                      help="only the output head's rows of the image tokens (Anole's recipe for Chameleon)")
    what.add_argument("--rank", type=cli.at_least(1, note="rank 0 would train nothing"), default=8,
                      help="LoRA rank (default 8)")
    what.add_argument("--alpha", type=cli.above(0), default=16.0, help="LoRA alpha: updates scaled by alpha/rank")
    what.add_argument("--lora-dropout", type=cli.checked(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=0.0)
    what.add_argument("--targets", type=targets, default=list(PROJECTIONS),
                      help=f"LoRA's projections, comma-separated (default {','.join(PROJECTIONS)}; lm_head too)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=count, default=200)
    run.add_argument("--batch", type=count, default=8, help="sequences per step, all ranks together")
    run.add_argument("--lr", type=cli.above(0), default=None,
                     help="peak learning rate, annealed linearly to zero as Emu3's quality fine-tuning (default: "
                          + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    run.add_argument("--warmup", type=cli.at_least(0), default=10)
    run.add_argument("--seed", type=cli.at_least(0), default=0)
    run.add_argument("--ckpt-every", type=count, default=100, help="checkpoint interval, in steps")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--change", action="append", default=[], metavar="FLAG",
                     type=lambda flag: flag.removeprefix("--").replace("-", "_"),
                     help="with --resume: a flag that may differ from the run's (e.g. steps)")
    run.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | mps")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="compute dtype (auto: bfloat16 on CUDA, float32 otherwise); a frozen base is stored in "
                          "it, trained weights stay fp32")
    run.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, grads and optimizer "
                     "state across the ranks (FSDP2)")
    run.add_argument("--checkpointing", action="store_true",
                     help="activation checkpointing: recompute each block in the backward pass")
    run.add_argument("--plan-only", action="store_true", help="print the memory plan and stop")
    out = p.add_argument_group("output")
    out.add_argument("--save-merged", action="store_true",
                     help="LoRA: also write the merged model in the released layout (OUT/model)")
    out.add_argument("--samples", type=cli.at_least(0), default=8, help="images drawn for samples.png (0: none)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    given = [f for f in ("ckpt", "weights", "llamagen", "chameleon") if getattr(args, f)]
    if len(given) != 1:
        p.error("give one base model: --ckpt (a train_tiny.py run), --weights (Emu3), --llamagen (with --vq) or "
                "--chameleon")
    if args.llamagen and not args.vq:
        p.error("--llamagen needs --vq (its VQ file, e.g. vq_ds16_c2i.pt)")
    if args.vq and not (args.weights or args.llamagen):
        p.error("--vq goes with --weights (Emu3's original layout) or --llamagen")
    if args.full and args.image_head:
        p.error("--full and --image-head are two different choices of what trains: give one")
    if (args.image_size or args.gpt_model) and not (args.llamagen or args.chameleon):
        p.error("--image-size and --gpt-model go with --llamagen (--image-size also with --chameleon)")
    if args.class_map and not args.llamagen:
        p.error("--class-map maps class folders to a class-to-image model's classes: it goes with --llamagen")
    if args.change and not args.resume:
        p.error("--change goes with --resume")
    return args


# what the library raises for bad input only found once the base and the folder are read: a folder that breaks
# its convention, captions the tokenizer or the context cannot take, classes the model has no index for, another
# run in --out or one with other settings, an adapter for another base, a plan that does not fit the device, a
# missing or corrupt file. One line, exit 2.
USER_ERRORS = (UsageError, FolderError, FolderInUse, RunMismatch, AdapterMismatch, MemoryError, OSError, ValueError)

if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except USER_ERRORS as e:
        cli.ArgumentParser(prog="finetune.py").error(str(e) or type(e).__name__)
