"""Train a tiny Emu3 on a CPU: a VQ tokenizer, then ONE GPT that both draws shapes from captions and captions them.

    python train_tiny.py                          # the default: ~7 minutes on 2 CPU cores, writes out/tiny/
    python train_tiny.py --quick --out out/quick  # a smoke run in about a minute
    python train_tiny.py --resume                 # continue after a crash or Ctrl-C
    python train_tiny.py --video --out out/video  # also 8-frame clips: caption->clip, clip->caption (~25 min)
    torchrun --nproc_per_node=2 train_tiny.py     # data parallel (gloo on CPU, nccl on CUDA)
    python train_tiny.py --device cuda --preset small   # more compute, bigger models

Stages: (1) the VQ learns 64x64 shapes -> 8x8 codes; (2) a pool of toy images is encoded with it; (3) the GPT learns
caption->image and image->caption token strings (nano_emu/train.py); (4) evaluation with the deterministic shapes
checker (nano_emu/evaluate.py): metrics.json, loss curves and sample grids in the output folder.
With --video, clips of moving shapes join the VQ stage (8 frames -> 2 code frames through the causal temporal axis),
the pool and the GPT stage, and the evaluation draws and captions clips as well (clips.png).
"""

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nano_emu import cli, data
from nano_emu import evaluate as ev
from nano_emu.checkpoint import (SETTINGS_KEY, VQ_HASH_KEY, FolderInUse, RunMismatch, check_resume, check_same_vq,
                                 load_checkpoint, output_lock, read_meta, settings_of, weights_hash)
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.tiny import TINY_CFG_SCALE, TINY_TEMPERATURE, make_tokenizer, tiny_pipeline
from nano_emu.train import batch_rng, init_vq_for_training, setup_distributed, train_gpt, train_vq
from nano_emu.vq import VQConfig, VQModel

# what each preset trains; any flag given on the command line overrides its preset's value
PRESETS = {
    "tiny": dict(vq_steps=1750, vq_batch=8, vq_lr=1e-3, pool=8000, gpt_steps=2600, gpt_batch=24, gpt_lr=3e-3,
                 gpt_dim=128, gpt_layers=4, eval_per_triple=7, eval_images=256, tokenizer="words",
                 vq_width=4, p_drop_caption=0.1, visual_weight=0.5, understood_image_weight=0.0, answer_weight=2.0),
    "quick": dict(vq_steps=40, vq_batch=4, vq_lr=1e-3, pool=256, gpt_steps=40, gpt_batch=8, gpt_lr=2e-3,
                  gpt_dim=64, gpt_layers=2, eval_per_triple=1, eval_images=16, tokenizer="words",
                  vq_width=4, p_drop_caption=0.0, visual_weight=1.0, understood_image_weight=1.0, answer_weight=1.0),
    "small": dict(vq_steps=6000, vq_batch=16, vq_lr=1e-3, pool=40000, gpt_steps=6000, gpt_batch=64, gpt_lr=1e-3,
                  gpt_dim=384, gpt_layers=8, eval_per_triple=8, eval_images=1024, tokenizer="words",
                  vq_width=4, p_drop_caption=0.0, visual_weight=1.0, understood_image_weight=1.0, answer_weight=1.0),
}

# With --video, clips join both stages. The VQ gets twice the image run's steps and codes twice as wide (a code
# frame holds 4 frames of motion; at width 4 and the image run's steps, 70% of clip reconstructions read right, at
# width 8 and 2x steps 95%: docs/video.md); vq_clip_share of its steps train on a batch of 8-frame
# clips, all in its second half (vq_stage's curriculum; 0.25: images and clips alternate there). The GPT's steps
# are divided by (1 - gpt_clip_share), so its image steps stay the image run's (in expectation); clips get 60% of
# them and a pool of 12,000 (drawn clips 58% -> 76% right against 40% of 4,000). --vq-steps / --gpt-steps given by
# hand are totals.
VIDEO = {
    "tiny": dict(vq_width=8, vq_clip_share=0.25, vq_clip_batch=2, clip_pool=12000, gpt_clip_share=0.6,
                 eval_clips=216),
    "quick": dict(vq_width=8, vq_clip_share=0.25, vq_clip_batch=1, clip_pool=64, gpt_clip_share=0.5, eval_clips=12),
    "small": dict(vq_width=8, vq_clip_share=0.25, vq_clip_batch=4, clip_pool=40000, gpt_clip_share=0.6,
                  eval_clips=288),
}


def preset(args) -> dict:
    """The values the run's preset gives to every flag left unset (with --video, the clip knobs too)."""
    name = "quick" if args.quick else args.preset
    values = dict(PRESETS[name])
    if args.video:
        values.update(VIDEO[name])
        values["vq_steps"] *= 2
        share = values["gpt_clip_share"] if args.gpt_clip_share is None else args.gpt_clip_share
        values["gpt_steps"] = round(values["gpt_steps"] / (1 - share))
    return values


def fill_from_preset(args):
    """Give every flag left unset its preset's value (main, and the experiments/ scripts that reuse the stages)."""
    for key, value in preset(args).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# prompts for the sample grids: every colour, shape and position, all seen in training
SHOWCASE = [("red", "circle", "top left"), ("green", "square", "bottom right"), ("blue", "triangle", "center"),
            ("yellow", "square", "top right"), ("cyan", "triangle", "bottom left"), ("magenta", "square", "center")]


# flags --resume does not compare with the run's: where it writes and runs, how often it saves, what it evaluates with
RESUME_IGNORES = ("out", "resume", "change", "device", "ckpt_every", "eval_per_triple", "eval_images", "eval_clips",
                  "cfg", "temperature", "top_k")


def check_output_folder(out: Path, resume: bool) -> None:
    """Never silently train over someone's checkpoints."""
    existing = [p.name for p in (out / "vq.safetensors", out / "gpt.safetensors") if p.exists()]
    if existing and not resume:
        raise SystemExit(f"{out} already holds {', '.join(existing)}: pass --resume to continue that run, "
                         f"or --out to start a new one elsewhere")


def vq_stage(args, device, run, autocast):
    # images alone need no time axis (Emu3's causal temporal stack is for clips)
    cfg = VQConfig.tiny(temporal_factor=4 if args.video else 1, embed_dim=args.vq_width,
                        **({"ch": 32, "norm_groups": 8} if args.preset == "small" else {}))
    torch.manual_seed(args.seed)
    vq = VQModel(cfg).to(device)
    init_vq_for_training(vq)   # a checkpoint (--resume) overwrites it

    def sample_images(step):
        rng = batch_rng(args.seed, run.rank, step)
        # curriculum: images only for the first half (a VQ that met clips from step 0 never learned colour:
        # docs/video.md), so those batches are the image run's; after it, clips at twice the run's share
        if args.video and step >= args.vq_steps // 2 and rng.random() < 2 * args.vq_clip_share:
            clips = data.sample_moving_shapes(args.vq_clip_batch, rng)[0]
            return data.to_tensor(clips).to(device)   # (B, 8, 3, 64, 64) -> codes (B, 2, 8, 8)
        return data.to_tensor(data.sample_shapes(args.vq_batch, rng)[0]).to(device)

    with autocast:
        history = train_vq(vq, sample_images, args.vq_steps, args.vq_lr, args.out / "vq.safetensors",
                           {"kind": "vq", "config": asdict(cfg), SETTINGS_KEY: settings_of(args)}, run,
                           resume=args.resume, ckpt_every=args.ckpt_every)
    return vq.eval(), history


def encode_pool(vq, args, device, clips: bool = False):
    """The GPT's training data: `pool` fresh training-split images, or with clips=True `clip_pool` fresh 8-frame
    clips, VQ-encoded once: codes (N, 8, 8) or (N, 2, 8, 8), and their captions."""
    if clips:
        samples, captions, _ = data.sample_moving_shapes(args.clip_pool, np.random.default_rng([args.seed, 2]))
    else:
        samples, captions, _ = data.sample_shapes(args.pool, np.random.default_rng([args.seed, 1]))
    chunk = 32 if clips else 256   # 32 clips are 256 frames, as many pixels as 256 images
    with torch.no_grad():
        codes = [vq.encode(data.to_tensor(samples[i:i + chunk]).to(device)).cpu()
                 for i in range(0, len(samples), chunk)]
    return torch.cat(codes), captions


def gpt_stage(args, vq, device, run, autocast):
    tokenizer, tokenizer_spec = make_tokenizer(args.tokenizer, data.vocabulary())
    layout = Layout.tiny(vq.cfg.codebook_size, text_vocab=tokenizer.n_vocab)
    config = GPTConfig.tiny(layout.vocab_size, dim=args.gpt_dim, n_layer=args.gpt_layers,
                            intermediate_size=int(args.gpt_dim * 8 / 3) // 16 * 16)
    torch.manual_seed(args.seed)
    gpt = GPT(config).to(device)
    codes, captions = encode_pool(vq, args, device)
    clip_pool = encode_pool(vq, args, device, clips=True) if args.video else None
    options = dict(p_drop_caption=args.p_drop_caption, visual_weight=args.visual_weight,
                   understood_image_weight=args.understood_image_weight, answer_weight=args.answer_weight)
    meta = {"kind": "gpt", "config": asdict(config), "layout": asdict(layout), "tokenizer": tokenizer_spec,
            "image_size": data.IMAGE_SIZE, "sequence_options": options,
            "sampling": {"cfg_scale": args.cfg, "temperature": args.temperature, "top_k": args.top_k},
            VQ_HASH_KEY: weights_hash(vq.state_dict()), SETTINGS_KEY: settings_of(args)}
    if args.resume and (args.out / "gpt.safetensors").is_file():   # a GPT half-trained on another VQ is not resumed
        check_same_vq(read_meta(args.out / "gpt.safetensors"), meta[VQ_HASH_KEY], args.out / "gpt.safetensors",
                      args.out / "vq.safetensors")
    with autocast:
        history = train_gpt(gpt, layout, tokenizer, codes, captions, args.gpt_steps, args.gpt_batch, args.gpt_lr,
                            args.out / "gpt.safetensors", meta, run, seed=args.seed, resume=args.resume,
                            ckpt_every=args.ckpt_every, sequence_options=options, clip_pool=clip_pool,
                            p_clip=args.gpt_clip_share if args.video else 0.0)
    return gpt.eval(), layout, tokenizer, history


@torch.no_grad()
def evaluate(args, vq, gpt, layout, tokenizer):
    """metrics.json and the pictures, through the same Pipeline a user samples with."""
    pipe = tiny_pipeline(gpt, vq, tokenizer, layout, image_size=data.IMAGE_SIZE,
                         sampling={"cfg_scale": args.cfg, "temperature": args.temperature, "top_k": args.top_k})
    rng = np.random.default_rng([args.seed, 3])
    metrics = {}
    n = args.eval_images
    images, _, attrs = data.sample_shapes(2 * n, rng, split="all")
    report = ev.vq_report(vq, images)
    metrics["vq_psnr_db"], metrics["codebook_usage"] = round(report["psnr"], 2), round(report["usage"], 3)
    metrics["vq_recon_checker"] = ev.adherence(report["recon"], attrs)

    k = args.eval_per_triple
    for split, triples in (("seen", data.TRAIN_TRIPLES), ("heldout", data.HELDOUT)):
        reps = k if split == "seen" else k * 8   # only 6 held-out triples: more samples each
        attrs = [t for t in triples for _ in range(reps)]
        captions = [data.caption(*t) for t in attrs]
        metrics[f"drawn_{split}"] = len(captions)
        for cfg_scale in (pipe.guidance.cfg_scale, 1.0):
            images = ev.draw(pipe, captions, cfg_scale=cfg_scale, seed=args.seed)
            metrics[f"adherence_{split}_cfg{cfg_scale:g}"] = ev.adherence(images, attrs)

    for split in ("train", "heldout"):
        images, _, attrs = data.sample_shapes(n if split == "train" else max(12, n // 2), rng, split=split)
        captions = ev.caption_images(pipe, images)
        metrics[f"caption_accuracy_{'seen' if split == 'train' else 'heldout'}"] = ev.caption_accuracy(captions, attrs)
        if split == "train":
            caption_examples = (images[:12], captions[:12], attrs[:12])

    # pictures: samples for a few prompts (the last two held out) with CFG and without, and captions
    prompts = [data.caption(*t) for t in SHOWCASE] + [data.caption(*t) for t in data.HELDOUT[:2]]
    columns = 6 if n >= 64 else 2
    for cfg_scale, name in ((pipe.guidance.cfg_scale, "samples.png"), (1.0, "samples_cfg1.png")):
        images = ev.draw(pipe, [p for p in prompts for _ in range(columns)], cfg_scale=cfg_scale, seed=args.seed + 1)
        ev.image_grid(images, prompts, args.out / name, columns, title=f"text -> image, cfg {cfg_scale:g} "
                      f"(last two prompts held out of training)")
    images, captions, attrs = caption_examples
    ev.captioned_grid(images, captions, [data.parse_caption(c) == tuple(a) for c, a in zip(captions, attrs)],
                      args.out / "captions.png", title="image -> text (greedy): the GPT's captions of fresh images")
    if args.video:
        metrics.update(evaluate_clips(args, pipe, vq))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


# a clip per row in clips.png: every colour, shape and direction
CLIP_SHOWCASE = [("red", "circle", "left"), ("green", "square", "down"), ("blue", "triangle", "right"),
                 ("yellow", "square", "up"), ("cyan", "circle", "right"), ("magenta", "triangle", "left")]


def evaluate_clips(args, pipe, vq) -> dict:
    """The --video metrics, through the same Pipeline calls (draw with frames, answer_clip): the VQ on clips,
    drawn clips read back by the checker (colour, shape, direction of motion), clip captions; and clips.png."""
    rng = np.random.default_rng([args.seed, 4])   # its own stream: the image metrics stay the image run's
    metrics = {}
    clips, _, attrs = data.sample_moving_shapes(max(16, args.eval_images // 2), rng)
    report = ev.vq_report(vq, clips, batch_size=32)
    metrics["vq_psnr_clips_db"] = round(report["psnr"], 2)
    metrics["vq_recon_checker_clips"] = ev.adherence(report["recon"], attrs)

    triples = [(c, s, d) for c in data.COLORS for s in data.SHAPES for d in data.DIRECTIONS]
    attrs = [triples[i % len(triples)] for i in range(args.eval_clips)]   # every triple equally often
    prompts = [data.video_caption(*t) for t in attrs]
    metrics["drawn_clips"] = len(prompts)
    for cfg_scale in (pipe.guidance.cfg_scale, 1.0):
        scores = data.score(ev.draw_clips(pipe, prompts, cfg_scale=cfg_scale, seed=args.seed), attrs)
        metrics[f"clip_adherence_cfg{cfg_scale:g}"] = scores["all"]
        for key in ("color", "shape", "direction", "unreadable"):
            metrics[f"clip_{key}_cfg{cfg_scale:g}"] = scores[key]

    clips, _, attrs = data.sample_moving_shapes(args.eval_images, rng)
    metrics["clip_caption_accuracy"] = ev.caption_accuracy(ev.caption_clips(pipe, clips), attrs, video=True)

    prompts = [data.video_caption(*t) for t in CLIP_SHOWCASE]
    clips = ev.draw_clips(pipe, prompts, seed=args.seed + 1)   # (6, 8, H, W, 3)
    ev.image_grid(clips.reshape(-1, *clips.shape[2:]), prompts, args.out / "clips.png", clips.shape[1],
                  title=f"text -> clip, cfg {pipe.guidance.cfg_scale:g}: the {clips.shape[1]} frames of one clip per row")
    return metrics


def main(args):
    args.out = Path(args.out)
    # one run per --out (rank 0 holds it for all ranks): a second is refused, naming this one's pid
    with output_lock(args.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return train(args)


def train(args):
    fill_from_preset(args)
    device = cli.resolve_device(args.device)
    run, device = setup_distributed(device)
    if run.world > 1 and device.type == "cpu":   # processes share the cores: oversubscribed threads crawl
        torch.set_num_threads(max(1, (torch.get_num_threads()) // run.world))
    if run.main:
        check_output_folder(args.out, args.resume)
        if args.resume:   # the run in --out, with its settings (but those --change names); or a fresh one
            print(check_resume(args.out, settings_of(args), ignore=RESUME_IGNORES, allowed=args.change,
                               hint="to change a flag on purpose, add --change FLAG (e.g. --change gpt-steps)"))
        args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()
    timings, start = {}, time.time()

    vq, vq_history = vq_stage(args, device, run, autocast)
    timings["vq_s"] = round(time.time() - start, 1)
    gpt, layout, tokenizer, gpt_history = gpt_stage(args, vq, device, run, autocast)
    timings["gpt_s"] = round(time.time() - start - timings["vq_s"], 1)
    if not run.main:
        return None
    ev.plot_losses({"vq": vq_history, "gpt": gpt_history}, args.out / "loss.png", {"vq": "recon", "gpt": "loss"})
    metrics = evaluate(args, vq, gpt, layout, tokenizer)
    timings["eval_s"] = round(time.time() - start - timings["vq_s"] - timings["gpt_s"], 1)
    timings["total_s"] = round(time.time() - start, 1)
    metrics.update(timings, final_vq_recon=vq_history[-1]["recon"], final_gpt_loss=gpt_history[-1]["loss"],
                   first_vq_recon=vq_history[0]["recon"], first_gpt_loss=gpt_history[0]["loss"])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\n{'metric':34s} value\n" + "\n".join(f"{k:34s} {v}" for k, v in metrics.items()))
    print(f"\nwrote {args.out}/: vq.safetensors gpt.safetensors metrics.json loss.png samples.png "
          f"samples_cfg1.png captions.png" + (" clips.png" if args.video else ""))
    return metrics


def parse_args(argv=None):
    count, rate = cli.at_least(1), cli.above(0)   # steps, sizes and learning rates are all positive
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=cli.output_folder, default="out/tiny",
                   help="output folder (checkpoints, metrics, pictures)")
    p.add_argument("--preset", default="tiny", choices=[k for k in PRESETS if k != "quick"],
                   help="model sizes and step counts: tiny = ~7 min on 2 CPU cores; small = for a GPU")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute (CI): tiny models, few steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--change", action="append", default=[], type=lambda flag: flag.removeprefix("--").replace("-", "_"),
                   metavar="FLAG", help="with --resume: a flag that may differ from the run's (e.g. gpt-steps)")
    p.add_argument("--video", action="store_true", help="also train on 8-frame moving-shapes clips")
    p.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype for training (float32 = no autocast)")
    p.add_argument("--seed", type=cli.at_least(0), default=0)
    p.add_argument("--cfg", type=cli.above(0), default=TINY_CFG_SCALE,
                   help="CFG scale for evaluation and sample grids (compared with cfg 1 = no guidance); "
                        "saved in the checkpoint as its default")
    p.add_argument("--temperature", type=cli.at_least(0, float), default=TINY_TEMPERATURE,
                   help="sampling temperature for evaluation and sample grids; saved as the checkpoint's default")
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
                             ("answer-weight", cli.above(0), "loss weight of a caption written for an image"),
                             ("understood-image-weight", cli.at_least(0, float), "loss weight of the image block "
                              "of image->caption strings, relative to generation strings (0 = Emu3: none)")]:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: from the preset)")
    p.add_argument("--tokenizer", choices=["words", "bytes"], default=None,
                   help="caption tokens: whole words (7 a caption) or UTF-8 bytes (28) (default: from the preset)")
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
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (FolderInUse, RunMismatch) as e:   # another run holds --out; --resume asks for another run
        cli.ArgumentParser().error(str(e))
