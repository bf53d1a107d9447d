"""The tiny runs' recipe: what train_tiny.py trains, with what settings, and how it scores the result.

train_tiny.py parses flags and hands them to `train`; the stages live here so that every script that needs them
(train_tiny.py, posttrain.py) reads one copy:

- PRESETS: model sizes and step counts per preset (a flag left unset takes its preset's value), VIDEO: the clip
  knobs of --video runs, SAMPLING: how each kind of run samples (one table);
- `prepare`: the worlds (a folder is read and checked here), the caption tokenizer, the VQ config and the token
  layout, every caption checked against the context, all before any training step;
- the stages: `vq_stage` (the VQ learns images -> codes), `gpt_stage` (the GPT learns caption -> image and
  image -> caption strings, nano_emu/train.py), `evaluate_run` (metrics.json and pictures through the same Pipeline a
  user samples with, nano_emu/evaluate.py);
- `train`: the three in order, with timings, into the run's folder.
"""

import argparse
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import cli, evaluate, plans, scenes, shapes
from .checkpoint import (SETTINGS_KEY, VQ_HASH_KEY, RunMismatch, check_resume, check_same_vq, read_meta, settings_of,
                         weights_hash)
from .folder import Folder
from .gpt import GPT, GPTConfig
from .image import to_tensor
from .layout import Layout
from .posttrain import Settings, memorised, minutes, post_train, quick_scores, read_curve, round_path
from .tiny import choose_tokenizer, describe_tokenizer, load_tiny, tiny_pipeline
from .train import Pool, batch_rng, init_vq_for_training, setup_distributed, train_gpt, train_vq
from .vq import VQConfig, VQModel
from .world import MovingShapes, Scenes, Shapes, World

# what each preset trains; any flag given on the command line overrides its preset's value
PRESETS = {
    "tiny": dict(vq_steps=1750, vq_batch=8, vq_lr=1e-3, pool=8000, gpt_steps=2600, gpt_batch=24, gpt_lr=3e-3,
                 gpt_dim=128, gpt_layers=4, eval_per_triple=7, eval_images=256, tokenizer="auto",
                 vq_width=4, p_drop_caption=0.1, visual_weight=0.5, understood_image_weight=0.0, answer_weight=2.0),
    "quick": dict(vq_steps=40, vq_batch=4, vq_lr=1e-3, pool=256, gpt_steps=40, gpt_batch=8, gpt_lr=2e-3,
                  gpt_dim=64, gpt_layers=2, eval_per_triple=1, eval_images=16, tokenizer="auto",
                  vq_width=4, p_drop_caption=0.0, visual_weight=1.0, understood_image_weight=1.0, answer_weight=1.0),
    # --world scenes: tiny's VQ (the objects are the shapes world's sprites) and GPT, trained longer on a larger
    # pool (captions are sentences, and each scene also brings questions to answer): at equal time more steps of
    # this GPT beat a wider, deeper one (docs/scenes.md); 9 draws per prompt, so that a category is scored on ~100
    "scenes": dict(vq_steps=1750, vq_batch=8, vq_lr=1e-3, pool=30000, gpt_steps=10000, gpt_batch=24, gpt_lr=3e-3,
                   gpt_dim=128, gpt_layers=4, eval_per_triple=9, eval_images=256, tokenizer="auto",
                   vq_width=4, p_drop_caption=0.1, visual_weight=0.5, understood_image_weight=0.0,
                   answer_weight=2.0),
    "small": dict(vq_steps=6000, vq_batch=16, vq_lr=1e-3, pool=40000, gpt_steps=6000, gpt_batch=64, gpt_lr=1e-3,
                  gpt_dim=384, gpt_layers=8, eval_per_triple=8, eval_images=1024, tokenizer="auto",
                  vq_width=4, p_drop_caption=0.0, visual_weight=1.0, understood_image_weight=1.0, answer_weight=1.0),
}

# With --video, clips join both stages. The VQ gets twice the image run's steps and codes twice as wide (a code
# frame holds 4 frames of motion, and a narrower, shorter-trained VQ misreads motion: docs/video.md);
# vq_clip_share of its steps train on a batch of 8-frame clips, all in its second half (vq_stage's curriculum).
# The GPT's steps are divided by (1 - gpt_clip_share), so its image steps stay the image run's (in expectation);
# clips get the larger share and a larger pool, which drew clips right more often (docs/video.md).
# --vq-steps / --gpt-steps given by hand are totals.
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
    if args.video:   # (--video does not go with --world scenes: make_worlds refuses it)
        values.update(VIDEO.get(name, VIDEO["tiny"]))
        values["vq_steps"] *= 2
        share = values["gpt_clip_share"] if args.gpt_clip_share is None else args.gpt_clip_share
        values["gpt_steps"] = round(values["gpt_steps"] / (1 - share))
    return values


# How a run samples when it evaluates, and what its checkpoint saves as its default (--cfg / --temperature override
# it), per kind of run: one table. Chosen on validation draws (experiments/sweep_sampling.py, on seeds the reported
# evaluation never uses): CFG 2 everywhere (CFG 3 overshoots models this small); temperature 0.5 for the shapes
# world, where it drew better than 1 in both seeds' checkpoints; scenes gained nothing from another temperature,
# clips and folders were not swept (docs/tiny_model.md, docs/scenes.md).
SAMPLING = {
    "shapes": dict(cfg=2.0, temperature=0.5),
    "scenes": dict(cfg=2.0, temperature=1.0),
    "video": dict(cfg=2.0, temperature=1.0),
    "folder": dict(cfg=2.0, temperature=1.0),
}


def run_kind(args) -> str:
    """Which row of SAMPLING a run takes: its folder, its clips, or its built-in world."""
    return "folder" if args.data is not None else "video" if args.video else args.world


def fill_from_preset(args):
    """Give every setting left unset (None) its preset's value, and the sampling its run kind's (SAMPLING)."""
    if args.preset is None:   # the world's own preset unless one is named
        args.preset = "scenes" if args.world == "scenes" else "tiny"
    for key, value in preset(args).items():   # (a preset may set what no flag offers)
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in SAMPLING[run_kind(args)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class UsageError(ValueError):
    """A problem with what the user asked for (flags, folder, captions), found before any training step."""


# flags --resume does not compare with the run's: where it writes and runs, how often it saves, what it evaluates with
RESUME_IGNORES = ("out", "resume", "change", "device", "compile", "ckpt_every", "eval_per_triple", "eval_images",
                  "eval_clips", "cfg", "temperature", "top_k")


def check_output_folder(out: Path, resume: bool) -> None:
    """Never silently train over someone's checkpoints."""
    existing = [p.name for p in (out / "vq.safetensors", out / "gpt.safetensors") if p.exists()]
    if existing and not resume:
        raise UsageError(f"{out} already holds {', '.join(existing)}: pass --resume to continue that run, "
                         f"or --out to start a new one elsewhere")


def make_worlds(args) -> list[World]:
    """The run's worlds: the main one (the shapes world, scenes, or --data FOLDER), then with --video the clips."""
    if args.data is not None:
        main = Folder(args.data, image_size=args.image_size or 64, heldout_fraction=args.heldout_fraction,
                      seed=args.seed, strict=args.strict, background=args.background,
                      caption_column=args.caption_column)
    else:
        if args.image_size not in (None, 64):
            raise UsageError(f"--image-size {args.image_size}: the built-in worlds are 64x64; --image-size goes with "
                             f"--data FOLDER")
        main = Scenes(plans=args.plan) if args.world == "scenes" else Shapes()
    if args.plan and not main.plans:
        raise UsageError(f"--plan writes each picture's layout in words before it, which only the scenes world knows "
                         f"(not {'your folder' if args.data is not None else 'the shapes world'}): add --world scenes")
    if args.data is not None and args.world != "shapes":
        raise UsageError("--data FOLDER is the world to train on; it does not go with --world")
    if args.video and (args.data is not None or args.world != "shapes"):
        raise UsageError("--video trains on moving shapes beside the shapes world; it does not go with --data or "
                         "--world scenes")
    return [main] + ([MovingShapes()] if args.video else [])


def check_context(worlds: list[World], tokenizer, layout: Layout, grid: tuple[int, int], t: int,
                  context: int) -> None:
    """Refuse, before training, any text whose token string would not fit the GPT's context (never truncated)."""
    h, w = grid
    block = 3 + len(tokenizer.encode(f"{t}*{h}*{w}")) + t * (h * (w + 1) + 1)   # BOI meta IMG rows EOF.. EOI
    room = context - block - 3                                                  # BOS, EOS, and one to spare
    if layout.has_plans:   # BOP, the longest plan (every object, each the longest words), EOP
        entry = "large magenta triangle at bottom middle"
        room -= 2 + len(tokenizer.encode(plans.SEPARATOR.join([entry] * scenes.MAX_OBJECTS)))
    for world in worlds:
        for text in world.texts():
            n = len(tokenizer.encode(text))
            if n > room:
                raise UsageError(f"{world.where(text)}the caption {text[:60]!r}{'...' if len(text) > 60 else ''} is "
                                 f"{n} tokens; with the {h}x{w}-code image block the model's context of {context} "
                                 f"leaves room for {room}: shorten it (or use a smaller --image-size)")


def vq_config(args, worlds) -> VQConfig:
    # images alone need no time axis (Emu3's causal temporal stack is for clips)
    return VQConfig.tiny(temporal_factor=4 if any(world.frames for world in worlds) else 1, embed_dim=args.vq_width,
                         **({"ch": 32, "norm_groups": 8} if args.preset == "small" else {}))


def vq_stage(args, worlds, cfg, device, run, autocast):
    clips = [world for world in worlds if world.frames]
    torch.manual_seed(args.seed)
    vq = VQModel(cfg).to(device)
    init_vq_for_training(vq)   # a checkpoint (--resume) overwrites it

    def sample_images(step):
        rng = batch_rng(args.seed, run.rank, step)
        # curriculum: images only for the first half (a VQ that met clips from step 0 never learned colour:
        # docs/video.md), so those batches are the image run's; after it, clips at twice the run's share
        if clips and step >= args.vq_steps // 2 and rng.random() < 2 * args.vq_clip_share:
            return to_tensor(clips[0].sample(args.vq_clip_batch, rng).pixels).to(device)   # (B, 8, 3, H, W)
        return to_tensor(worlds[0].sample(args.vq_batch, rng).pixels).to(device)           # (B, 3, H, W)

    with autocast:
        history = train_vq(vq, sample_images, args.vq_steps, args.vq_lr, args.out / "vq.safetensors",
                           {"kind": "vq", "config": asdict(cfg), SETTINGS_KEY: settings_of(args)}, run,
                           resume=args.resume, ckpt_every=args.ckpt_every)
    return vq.eval(), history


def gpt_config(args, layout: Layout) -> GPTConfig:
    return GPTConfig.tiny(layout.vocab_size, dim=args.gpt_dim, n_layer=args.gpt_layers,
                          intermediate_size=int(args.gpt_dim * 8 / 3) // 16 * 16)   # Llama's 8/3 SwiGLU width


def gpt_stage(args, worlds, tokenizer, tokenizer_spec, layout, vq, device, run, autocast):
    config = gpt_config(args, layout)
    torch.manual_seed(args.seed)
    gpt = GPT(config).to(device)
    pools = []
    for k, world in enumerate(worlds):   # the GPT's data: each world's pool, VQ-encoded once
        examples = world.pool(args.clip_pool if world.frames else args.pool, np.random.default_rng([args.seed, k + 1]))
        pools.append(Pool(evaluate.encode(vq, examples.pixels), examples.captions, examples.answers,
                          share=args.gpt_clip_share if world.frames else 1.0, plans=examples.plans))
    options = dict(p_drop_caption=args.p_drop_caption, visual_weight=args.visual_weight,
                   understood_image_weight=args.understood_image_weight, answer_weight=args.answer_weight)
    meta = {"kind": "gpt", "config": asdict(config), "layout": asdict(layout), "tokenizer": tokenizer_spec,
            "image_size": worlds[0].image_size, "world": worlds[0].name, "sequence_options": options,
            "sampling": {"cfg_scale": args.cfg, "temperature": args.temperature, "top_k": args.top_k},
            VQ_HASH_KEY: weights_hash(vq.state_dict()), SETTINGS_KEY: settings_of(args)}
    if args.resume and (args.out / "gpt.safetensors").is_file():   # a GPT half-trained on another VQ is not resumed
        check_same_vq(read_meta(args.out / "gpt.safetensors"), meta[VQ_HASH_KEY], args.out / "gpt.safetensors",
                      args.out / "vq.safetensors")
    with autocast:
        history = train_gpt(gpt, layout, tokenizer, pools, args.gpt_steps, args.gpt_batch, args.gpt_lr,
                            args.out / "gpt.safetensors", meta, run, seed=args.seed, resume=args.resume,
                            ckpt_every=args.ckpt_every, sequence_options=options, compile=args.compile)
    return gpt.eval(), history


@torch.no_grad()
def evaluate_run(args, worlds, vq, gpt, layout, tokenizer) -> dict:
    """metrics.json and the pictures, every world through the same Pipeline a user samples with (evaluate.py)."""
    pipe = tiny_pipeline(gpt, vq, tokenizer, layout, image_size=worlds[0].image_size,
                         sampling={"cfg_scale": args.cfg, "temperature": args.temperature, "top_k": args.top_k})
    columns = 6 if args.eval_images >= 64 else 2
    metrics = {}
    for world in worlds:
        metrics.update(evaluate.evaluate(pipe, world, args.out, seed=args.seed, n=args.eval_images, columns=columns,
                                   repeats=args.eval_clips if world.frames else args.eval_per_triple))
    return metrics


class Setup(NamedTuple):
    worlds: list[World]
    tokenizer: object
    tokenizer_spec: object
    vq_cfg: VQConfig
    layout: Layout


def prepare(args) -> Setup:
    """Flags -> what the run trains on and with, all checked before any training step: the worlds (a folder is
    read here), the caption tokenizer, the VQ's config and the token layout; every caption fits the context."""
    worlds = make_worlds(args)
    tokenizer, tokenizer_spec = choose_tokenizer(args.tokenizer, worlds)
    vq_cfg = vq_config(args, worlds)
    layout = Layout.tiny(vq_cfg.codebook_size, text_vocab=tokenizer.n_vocab, plan=args.plan)
    side = worlds[0].image_size // vq_cfg.spatial_factor
    check_context(worlds, tokenizer, layout, (side, side), t=shapes.VIDEO_FRAMES // vq_cfg.temporal_factor
                  if args.video else 1, context=GPTConfig.tiny(layout.vocab_size).max_seq_len)
    return Setup(worlds, tokenizer, tokenizer_spec, vq_cfg, layout)


def train(args):
    fill_from_preset(args)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    plan = prepare(args)   # a user's folder is read and checked here, before anything is trained
    worlds, tokenizer, tokenizer_spec, vq_cfg, layout = plan
    device = cli.resolve_device(args.device)
    run, device = setup_distributed(device)
    if run.world_size > 1 and device.type == "cpu":   # processes share the cores: oversubscribed threads crawl
        torch.set_num_threads(max(1, (torch.get_num_threads()) // run.world_size))
    if run.main:
        check_output_folder(args.out, args.resume)
        if args.resume:   # the run in --out, with its settings (but those --change names); or a fresh one
            print(check_resume(args.out, settings_of(args), ignore=RESUME_IGNORES, allowed=args.change,
                               hint="to change a flag on purpose, add --change FLAG (e.g. --change gpt-steps)"))
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"captions: {describe_tokenizer(tokenizer_spec)}")
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()
    timings, start = {}, time.time()

    vq, vq_history = vq_stage(args, worlds, vq_cfg, device, run, autocast)
    timings["vq_s"] = round(time.time() - start, 1)
    gpt, gpt_history = gpt_stage(args, worlds, tokenizer, tokenizer_spec, layout, vq, device, run, autocast)
    timings["gpt_s"] = round(time.time() - start - timings["vq_s"], 1)
    if not run.main:
        return None
    evaluate.plot_losses({"vq": vq_history, "gpt": gpt_history}, args.out / "loss.png", {"vq": "recon", "gpt": "loss"})
    metrics = evaluate_run(args, worlds, vq, gpt, layout, tokenizer)
    timings["eval_s"] = round(time.time() - start - timings["vq_s"] - timings["gpt_s"], 1)
    timings["total_s"] = round(time.time() - start, 1)
    metrics.update(timings, final_vq_recon=vq_history[-1]["recon"], final_gpt_loss=gpt_history[-1]["loss"],
                   first_vq_recon=vq_history[0]["recon"], first_gpt_loss=gpt_history[0]["loss"])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\n{'metric':34s} value\n" + "\n".join(f"{k:34s} {v}" for k, v in metrics.items()))
    pictures = sorted(p.name for p in args.out.glob("*.png"))
    print(f"\nwrote {args.out}/: vq.safetensors gpt.safetensors metrics.json {' '.join(pictures)}")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# post-training a finished run (posttrain.py; the stage is nano_emu/posttrain.py)


def run_settings(run: Path) -> argparse.Namespace:
    """The flags a finished run was trained with (stored in its checkpoints), to rebuild its worlds and evaluation;
    a folder that is no finished train_tiny.py run is a UsageError saying why."""
    for name in ("vq.safetensors", "gpt.safetensors"):
        if not (run / name).is_file():
            raise UsageError(f"{run} is not a train_tiny.py run: it has no {name} (give --run the --out folder of a "
                             f"finished run)")
    meta = read_meta(run / "gpt.safetensors")
    if SETTINGS_KEY not in meta:
        raise UsageError(f"{run / 'gpt.safetensors'} records no training settings (a checkpoint from before runs "
                         f"stored them): its world cannot be rebuilt to judge its drawings")
    settings = {"plan": False, **meta[SETTINGS_KEY]}   # runs from before --plan had none
    return argparse.Namespace(**{k: Path(v) if k in ("out", "data") and v is not None else v
                                 for k, v in settings.items()})


def post_train_run(args) -> dict:
    """posttrain.py: post-train the run in args.run into args.out (a new run folder: its checkpoints, rollouts,
    curve, metrics.json beside the pretrained model's metrics_before.json)."""
    run_args = run_settings(args.run)
    world = make_worlds(run_args)[0]
    if not world.checker and not getattr(world, "repeats", True):
        raise UsageError(f"{args.run}: its folder's captions are all different, so the model's reading of a drawing "
                         f"can only match its caption word for word: there is no judge to post-train against")
    if args.judge == "checker" and not world.checker:
        print(f"the {world.name} world has no checker: the model's own reading of its drawings judges them")
    settings = Settings(method=args.method, rounds=args.rounds, prompts=args.prompts, k=args.k,
                        steps_per_round=args.steps_per_round, batch=args.batch, lr=args.lr, cfg=args.cfg,
                        temperature=args.temperature, beta=args.beta, ce=args.ce, clip=args.clip, kl=args.kl,
                        judge=args.judge, balance=args.balance, seed=args.seed)
    check_output_folder(args.out, args.resume)
    args.out.mkdir(parents=True, exist_ok=True)
    device = cli.resolve_device(args.device)
    pipe = load_tiny(args.run, device=device)
    shutil.copy(args.run / "vq.safetensors", args.out / "vq.safetensors")
    if (args.run / "metrics.json").is_file():
        shutil.copy(args.run / "metrics.json", args.out / "metrics_before.json")
    anchor_examples = world.pool(args.anchor_pool, np.random.default_rng([run_args.seed, 101]))
    anchor = Pool(evaluate.encode(pipe.vq, anchor_examples.pixels), anchor_examples.captions,
                  anchor_examples.answers, plans=anchor_examples.plans)
    source = read_meta(args.run / "gpt.safetensors")
    meta = {k: v for k, v in source.items() if k not in ("step", "steps", "history")}
    meta["posttrained_from"] = str(args.run)
    if args.sample_cfg is not None:   # how the post-trained run samples by default (both CFGs are evaluated)
        meta["sampling"] = {**meta.get("sampling", {}), "cfg_scale": args.sample_cfg}
    asked = {"run": str(args.run), **asdict(settings)}
    if args.resume and (args.out / "posttrain.json").is_file():   # a resumed stage takes the steps it would have
        stored = json.loads((args.out / "posttrain.json").read_text())
        changed = [f"{k} {stored.get(k)!r} there, {v!r} now" for k, v in asked.items() if stored.get(k) != v]
        if changed:
            raise RunMismatch(f"--resume: {args.out} was post-trained with other settings ({'; '.join(changed)}): "
                              f"resume it with its own, or post-train into a new --out")
    (args.out / "posttrain.json").write_text(json.dumps(asked, indent=2))

    clock = {"start": time.perf_counter(), "paused": 0.0, "offset": 0.0}
    curve = read_curve(args.out) if args.resume else []
    if not args.resume:
        (args.out / "curve.jsonl").unlink(missing_ok=True)
    if curve:
        clock["offset"] = curve[-1]["minutes"] * 60

    def point(round_done: int) -> None:
        paused = time.perf_counter()
        elapsed = clock["offset"] + paused - clock["start"] - clock["paused"]
        rounds = [r for r in read_curve(args.out) if r["round"] < round_done]   # a resumed run redraws its points
        accepted = [info["accepted"] for info in round_infos(args.out, round_done)]
        row = {"round": round_done, "step": round_done * settings.steps_per_round, "minutes": minutes(elapsed),
               "accepted": accepted[-1] if accepted else None,
               **quick_scores(pipe, world, args.curve_repeats, run_args.seed)}
        (args.out / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds + [row]))
        print(f"curve: {row}")
        clock["paused"] += time.perf_counter() - paused

    if not curve:
        point(0)

    def after_round(round_: int) -> None:
        if (round_ + 1) % args.curve_every == 0 or round_ + 1 == settings.rounds:
            point(round_ + 1)

    history = post_train(pipe, world, settings, anchor, source.get("sequence_options", {}), args.out, meta,
                         resume=args.resume, ckpt_every=args.ckpt_every, after_round=after_round)
    seconds = clock["offset"] + time.perf_counter() - clock["start"] - clock["paused"]
    evaluate.plot_losses({"post-train": history}, args.out / "loss.png", {"post-train": "loss"})
    plot_curve(read_curve(args.out), args.out / "curve.png", settings.method)
    run_args.out = args.out
    metrics = evaluate_run(run_args, [world], pipe.vq, pipe.gpt, pipe.layout, pipe.tokenizer)
    if settings.method != "continue":
        metrics["memorised_seen"] = round(memorised(pipe, world, args.out, run_args.eval_per_triple, run_args.seed), 4)
    metrics.update(posttrain_minutes=minutes(seconds), method=settings.method,
                   accepted_per_round=[info["accepted"] for info in round_infos(args.out, settings.rounds)])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    before_path = args.out / "metrics_before.json"
    before = json.loads(before_path.read_text()) if before_path.is_file() else {}
    print(f"\n{'metric':34s} {'before':>10s} {'after':>10s}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not key.endswith("_s"):
            print(f"{key:34s} {before.get(key, ''):>10} {value:>10}")
    print(f"\nwrote {args.out}/: gpt.safetensors vq.safetensors metrics.json metrics_before.json curve.jsonl "
          f"curve.png rollouts/ and the evaluation's pictures")
    return metrics


def round_infos(out: Path, rounds: int) -> list[dict]:
    return [read_meta(round_path(out, r)) for r in range(rounds) if round_path(out, r).is_file()]


def plot_curve(rows: list[dict], path: Path, method: str) -> None:
    """curve.png: the checker's overall score against minutes of post-training, seen and held-out, with and
    without guidance."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for key in [k for k in (rows[0] if rows else {}) if k.startswith(("seen_", "heldout_")) and k.count("_") == 1]:
        ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], marker="o", lw=1, label=key.replace("_", ", "))
    ax.set(title=f"post-training ({method}): overall score", xlabel="minutes of post-training", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
