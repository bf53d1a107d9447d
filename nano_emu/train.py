"""Training the tiny models: the VQ on pixels, then the GPT on Emu3-style token strings.

Both stages share one loop, `fit`: AdamW with a short warmup and cosine decay, a tqdm bar, atomic checkpoints
every `ckpt_every` steps (checkpoint.py), `resume` that continues from the last checkpoint, and Ctrl-C that saves
before it exits. Batches are a function of (seed, rank, step), so a resumed run sees exactly the batches it would
have seen. Data parallel training is nanoGPT's: torchrun sets RANK / WORLD_SIZE, `setup_distributed` reads them
(gloo on CPU, nccl on CUDA), every rank draws its own batches and DDP averages the gradients.

The GPT learns two kinds of sequence with one next-token loss (Emu3, baaivision/Emu3 emu3/train/datasets.py):
- generation:    BOS caption BOI "h*w" IMG rows.. EOF EOI EOS  -- the caption is dropped 10% of the time, which
                 teaches the unconditional branch CFG needs; visual tokens are weighted 0.5 as in Emu3; with plans
                 (layout.py's plan segment) the caption is followed by BOP plan EOP, dropped with it;
- understanding: BOS [image block] caption EOS                  -- loss on the caption and EOS only.
A clip is written the same way: its block says "t*h*w" and closes every code frame with EOF (layout.py).
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

try:   # FSDP2 and its DTensors are public from torch 2.6; an older torch trains without them (nothing is sharded)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:
    FSDPModule = DTensor = ()

from .checkpoint import load_checkpoint, load_extra, save_checkpoint
from .layout import Layout, Plan
from .vq import VectorQuantizer
from .vq_blocks import AttnBlock, CausalConv3d, ResnetBlock, TemporalResnetBlock
from .weights import check_state_dict

VISUAL_WEIGHT = 0.5   # Emu3 weights the loss on vision tokens by 0.5 relative to text


# ---------------------------------------------------------------------------------------------------------------
# what only VQ training needs (vq.py keeps the model a checkpoint fills)


@torch.no_grad()
def init_vq_for_training(vq) -> None:
    """Only matters when training from scratch (a checkpoint overwrites every weight). With default init the
    temporal stack scrambles the 4-channel latent and the 40-odd residual blocks add noise, and a toy VQ
    learns slowly. Starting every residual branch at zero and every causal time conv as a copy of the current
    frame makes the untrained model a plain 2-D autoencoder that learns to use time later, and reaches a given
    PSNR in far fewer steps (docs/tiny_model.md)."""
    for module in vq.modules():
        if isinstance(module, ResnetBlock):
            torch.nn.init.zeros_(module.conv2.weight), torch.nn.init.zeros_(module.conv2.bias)
        elif isinstance(module, AttnBlock):
            torch.nn.init.zeros_(module.proj_out.weight), torch.nn.init.zeros_(module.proj_out.bias)
        elif isinstance(module, TemporalResnetBlock):
            torch.nn.init.zeros_(module.conv2.conv.weight), torch.nn.init.zeros_(module.conv2.conv.bias)
    time_convs = [c.conv for c in (*vq.encoder.time_conv, *vq.decoder.time_conv)]
    for conv in (*time_convs, vq.quant_conv, vq.post_quant_conv):
        if not isinstance(conv, CausalConv3d):   # a 2-D VQ's 1x1 quant convs keep their default init
            continue
        weight = conv.conv.weight                    # (C_out, C_in, kt, kh, kw)
        torch.nn.init.zeros_(weight), torch.nn.init.zeros_(conv.conv.bias)
        kh, kw = weight.shape[3] // 2, weight.shape[4] // 2
        # tap 2 is the current frame: every causal conv pads 2 frames in front
        weight[:, :, 2, kh, kw] = torch.eye(weight.shape[0], device=weight.device)


@torch.no_grad()
def restart_dead_codes(quantizer: VectorQuantizer, latents: torch.Tensor, counts: torch.Tensor) -> int:
    """Against codebook collapse: codes with counts == 0 (unused since the last call) jump to random encoder
    outputs from the current batch, so they are used again. latents (B, C, t, h, w). Returns how many codes
    were restarted."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        z = latents.permute(0, 2, 3, 4, 1).reshape(-1, latents.shape[1])   # (N, C)
        z = z[torch.randint(len(z), (len(dead),), device=z.device)]
        quantizer.embedding.weight[dead] = F.normalize(z, dim=-1) if quantizer.l2_norm else z
    return len(dead)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> float:
    """Fraction of the codebook that occurs in `codes` (any shape): concatenate an epoch's codes for epoch usage."""
    return torch.bincount(codes.flatten(), minlength=codebook_size).gt(0).float().mean().item()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1   # processes (torchrun), not a world to train on (world.py)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Single process unless launched by torchrun; then join the process group (gloo on CPU, nccl on CUDA)
    and, on CUDA, take this rank's GPU."""
    if "RANK" not in os.environ:
        return Distributed(), device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The data stream is a pure function of (seed, rank, step): resuming replays it exactly."""
    return np.random.default_rng([seed, rank, step])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))   # cosine down to 10%


def linear_to_zero(step: int, steps: int, lr: float, warmup: int) -> float:
    """Emu3's quality fine-tuning schedule: after the warmup, the learning rate falls linearly to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (steps - step) / max(1, steps - warmup)


def whole_tensor(tensor):
    """A tensor as a whole: an FSDP2 shard (DTensor) is gathered from every rank (a collective), others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _placed_like(tensor: torch.Tensor, reference):
    """A whole tensor read from a checkpoint, sharded as `reference` is when that is an FSDP2 shard."""
    if not isinstance(reference, DTensor):
        return tensor
    return distribute_tensor(tensor.to(reference.device), reference.device_mesh, reference.placements)


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, names) -> None:
    """Copy a checkpoint's whole tensors into the model (into each rank's shard under FSDP2), after checking that
    it holds exactly `names` of the model's state dict with their shapes (one error lists every difference)."""
    check_state_dict(model, {k: tuple(v.shape) for k, v in state.items()}, source, keys=names)
    current = model.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            current[key].copy_(_placed_like(tensor, current[key]))


def _rng_state(device: torch.device) -> torch.Tensor:
    """The torch RNG that random draws on `device` use (the VQ's dead-code restarts), as a tensor to checkpoint."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def fit(model: torch.nn.Module, loss_fn: Callable, steps: int, lr: float, ckpt_path: Path, meta: dict,
        run: Distributed, ckpt_every: int = 250, resume: bool = False, warmup: int = 20, betas=(0.9, 0.95),
        clip_grad: float | None = 1.0, after_step: Callable | None = None, desc: str = "train",
        log_every: int = 10, extra: dict[str, torch.Tensor] | None = None, compile: dict | None = None,
        schedule: Callable = lr_at, trainable_only: bool = False) -> list:
    """Train `model` for `steps` steps of `loss_fn(net, step) -> (loss, logs)`; `net` is the model, DDP-wrapped
    when distributed. Checkpoints to ckpt_path (with `meta`, e.g. the config). Returns the logged history.
    extra: tensors of training state that loss_fn / after_step update in place (the VQ's code-usage counters);
    they are checkpointed with the weights and restored in place on resume, as is the torch RNG of the model's
    device, so that a resumed run takes the steps the uninterrupted one takes.
    compile: torch.compile's options to compile `net` with (None: eager); `model` is still what is saved.
    schedule(step, steps, lr, warmup) -> the step's learning rate (lr_at: warmup, then cosine down to 10%).
    Only the parameters that require grad train (a fine-tune's frozen base does not); trainable_only: the
    checkpoint holds those alone (a LoRA run saves its adapters, not the 8B model under them). A model sharded by
    FSDP2 (fully_shard, finetune.py) trains as it is, without DDP around it; its checkpoints hold whole tensors,
    gathered from every rank, so that it resumes on any number of processes."""
    device = next(model.parameters()).device
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, betas=betas, weight_decay=0.0)
    kept = list(trainable) if trainable_only else list(model.state_dict())   # what a checkpoint holds
    done, history, extra = 0, [], extra or {}
    if resume and ckpt_path.exists():
        state, saved, opt_state = load_checkpoint(ckpt_path, device=device)
        _load_weights(model, state, str(ckpt_path), kept)
        if opt_state is not None:
            params = list(trainable.values())
            for index, values in opt_state["state"].items():   # exp_avg, exp_avg_sq: sharded as their parameter
                for key, value in values.items():
                    if torch.is_tensor(value) and value.shape == params[index].shape:
                        values[key] = _placed_like(value, params[index])
            optimizer.load_state_dict(opt_state)
        saved_extra = load_extra(ckpt_path, device=device)
        for name, tensor in extra.items():
            if name in saved_extra:   # an older checkpoint without them resumes without them
                tensor.copy_(saved_extra[name])
        if "rng" in saved_extra:
            _set_rng_state(device, saved_extra["rng"].cpu())
        done, history = saved["step"], saved["history"]
        if run.main:
            print(f"resuming {desc} from {ckpt_path} at step {done}/{steps}")
    net = DistributedDataParallel(model) if run.world_size > 1 and not isinstance(model, FSDPModule) else model
    if compile is not None:   # the first steps pay the compiling
        net = torch.compile(net, **compile)

    def save():   # every rank takes part (gathering FSDP2 shards is a collective); the main one writes
        current = model.state_dict()
        weights = {k: whole_tensor(current[k]) for k in kept}
        opt_state = optimizer.state_dict()
        opt_state["state"] = {i: {k: whole_tensor(v) if torch.is_tensor(v) else v for k, v in values.items()}
                              for i, values in opt_state["state"].items()}
        if run.main:
            save_checkpoint(ckpt_path, weights, {**meta, "step": done, "steps": steps, "history": history},
                            opt_state, extra={**extra, "rng": _rng_state(device)})

    bar = tqdm(total=steps, initial=done, desc=desc, disable=not run.main, dynamic_ncols=True)
    try:
        while done < steps:
            for group in optimizer.param_groups:
                group["lr"] = schedule(done, steps, lr, warmup)
            loss, logs = loss_fn(net, done)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), clip_grad)
            optimizer.step()
            if after_step is not None:
                after_step(done)
            if done % log_every == 0 or done == steps - 1:
                history.append({"step": done, **{k: round(float(v), 5) for k, v in logs.items()}})
                bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items()})
            done += 1
            bar.update()
            if done % ckpt_every == 0 and done < steps:
                save()
    except KeyboardInterrupt:
        save()   # `done` counts only completed optimizer steps, so the checkpoint is consistent
        bar.close()
        if run.main:
            print(f"\ninterrupted: saved {ckpt_path} at step {done}; rerun with --resume to continue")
        raise
    finally:
        bar.close()   # an error is printed below the bar, not on its line
    save()
    return history


def train_vq(vq, sample_images: Callable, steps: int, lr: float, ckpt_path: Path, meta: dict, run: Distributed,
             restart_every: int = 20, **fit_kwargs) -> list:
    """The VQ stage: reconstruction + codebook + commitment losses (vq.py), with dead codes restarted every
    `restart_every` steps during the first 80% of training. sample_images(step) -> pixels in [-1, 1]."""
    # uses of each code since the last restart: training state, checkpointed beside the weights (fit's extra)
    counts = torch.zeros(vq.cfg.codebook_size, device=next(vq.parameters()).device)
    last = {}

    def loss_fn(net, step):
        x = sample_images(step)
        out = net(x)
        counts.add_(torch.bincount(out.codes.flatten(), minlength=len(counts)))
        last["x"] = x
        usage = (counts > 0).float().mean()
        return out.loss, {**out.losses, "usage": usage}

    def restart(step):
        if (step + 1) % restart_every or step > 0.8 * steps:
            return
        if run.world_size > 1:   # decide on all ranks' usage, restart on rank 0, share the new codebook
            dist.all_reduce(counts)
        if run.main:
            restart_dead_codes(vq.quantize, vq.latent(last["x"]), counts)
        if run.world_size > 1:
            dist.broadcast(vq.quantize.embedding.weight.data, src=0)
        counts.zero_()

    # plain Adam without clipping: clipped at 1.0, the toy VQ fell far behind at the same step count
    # (docs/tiny_model.md)
    return fit(vq, loss_fn, steps, lr, ckpt_path, meta, run, after_step=restart, betas=(0.9, 0.999),
               clip_grad=None, desc="vq", extra={"code_counts": counts}, **fit_kwargs)


class Pool(NamedTuple):
    """The GPT's training examples of one world, VQ-encoded once: codes (N, h, w) or (N, t, h, w), the caption each
    is drawn from and the (question, answer) strings each is understood with (("", caption) is captioning)."""
    codes: torch.Tensor
    captions: list[str]
    answers: list[list[tuple[str, str]]]
    share: float = 1.0        # the chance that a step's batch comes from this pool (the first takes the rest)
    plans: list[str] | None = None   # each example's plan (plans.py), written after its caption; None: no plans


def sequences(layout: Layout, tokenizer, codes: torch.Tensor, captions: list[str],
              answers: list[list[tuple[str, str]]], rng: np.random.Generator, p_understand: float = 0.5,
              p_drop_caption: float = 0.1, visual_weight: float = VISUAL_WEIGHT, understood_image_weight: float = 0.0,
              answer_weight: float = 1.0, plans: list[str] | None = None):
    """A mixed batch of generation and understanding sequences. codes (B, h, w) or (B, t, h, w).
    Returns inputs (B, T), targets (B, T) and loss weights (B, T) (0 on padding and on prompts).

    An understanding sequence asks one of the example's (question, answer) pairs, drawn uniformly when it has
    several. understood_image_weight: also put loss on the image block of an understanding sequence, this many
    times its weight in a generation string (0: the answer only, as Emu3; 1: every token alike, as CM3Leon and
    Chameleon). `BOS image caption` starts exactly like the unconditional generation string `BOS "" image`, so this
    trains CFG's unconditional branch on every understanding sequence for free.
    answer_weight: loss weight of the answer (and its EOS) of an understanding sequence.
    plans: each example's plan, written between its caption and its image (and dropped with the caption)."""
    def weight(token):
        return visual_weight if layout.first_visual <= token else 1.0

    rows = []
    for i, (item_codes, caption, pairs) in enumerate(zip(codes, captions, answers)):
        if rng.random() < p_understand:
            question, answer = pairs[rng.integers(len(pairs))] if len(pairs) > 1 else pairs[0]
            prompt = layout.understanding_prompt(item_codes, question, tokenizer)
            answer = tokenizer.encode(answer) + [layout.eos]
            tokens = prompt + answer
            prompt_weights = [understood_image_weight * weight(t) for t in prompt[1:]]
            weights = prompt_weights + [answer_weight] * len(answer)
        else:
            dropped = rng.random() < p_drop_caption
            plan = [] if plans is None or dropped else [Plan(plans[i])]
            tokens = layout.encode(["" if dropped else caption, *plan, item_codes], tokenizer, eos=True)
            weights = [weight(t) for t in tokens[1:]]
        rows.append((tokens, weights))
    length = max(len(tokens) for tokens, _ in rows)
    ids = torch.full((len(rows), length), layout.pad, dtype=torch.long)
    weight_grid = torch.zeros(len(rows), length - 1)
    for i, (tokens, weights) in enumerate(rows):   # right padding: causal attention never looks ahead at it
        ids[i, :len(tokens)] = torch.tensor(tokens)
        weight_grid[i, :len(weights)] = torch.tensor(weights)
    return ids[:, :-1], ids[:, 1:], weight_grid


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum()


def train_gpt(gpt, layout: Layout, tokenizer, pools: list[Pool], steps: int, batch_size: int, lr: float,
              ckpt_path: Path, meta: dict, run: Distributed, seed: int = 0, sequence_options: dict | None = None,
              compile: bool = False, **fit_kwargs) -> list:
    """The GPT stage: each step draws batch_size examples of one pool and writes each as a generation or an
    understanding sequence. pools[1:] are drawn with their share's probability (a --video run: clips beside
    images), pools[0] otherwise. A batch is all of one pool because the strings are right-padded to the longest
    one: a clip of t frames is ~t times an image's length, and one clip in a batch would pad every image to it.
    compile: torch.compile the GPT, with dynamic shapes (the strings' length changes from batch to batch)."""
    device = next(gpt.parameters()).device

    def loss_fn(net, step):
        rng = batch_rng(seed, run.rank, step)
        pool = pools[0]
        for other in pools[1:]:   # no draw with one pool: image runs keep their batches
            if rng.random() < other.share:
                pool = other
                break
        pick = rng.integers(len(pool.codes), size=batch_size)
        inputs, targets, weights = sequences(layout, tokenizer, pool.codes[pick], [pool.captions[i] for i in pick],
                                             [pool.answers[i] for i in pick], rng, **(sequence_options or {}),
                                             plans=None if pool.plans is None else [pool.plans[i] for i in pick])
        loss = weighted_loss(net(inputs.to(device)), targets.to(device), weights.to(device))
        return loss, {"loss": loss.detach()}

    return fit(gpt, loss_fn, steps, lr, ckpt_path, meta, run, desc="gpt",
               compile={"dynamic": True} if compile else None, **fit_kwargs)
