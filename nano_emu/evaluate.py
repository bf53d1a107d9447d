"""What a tiny run reports, for any world (world.py), through the same Pipeline a user samples with.

- VQ: reconstruction PSNR and codebook usage on examples it never trained on (a folder: its held-out files), and
  the world's checker on the reconstructions where it has one;
- likelihood: the GPT's negative log-likelihood of an image's codes given its caption, in nats per image token
  (teacher-forced, over the visual codes only: the markers are certain), on training and held-out examples --
  the number AR image models report, and one that means something for any folder of images;
- text -> image: drawn images read back by the world's checker (the shapes world: colour, shape and position all
  right; scenes: GenEval's categories), seen and held-out, with the checkpoint's CFG and without (cfg 1);
- plans (a model trained with them): how often the plan it writes agrees with the caption, before any drawing;
- image -> text: greedy captions (and answers to questions) of fresh examples, exact match;
- pictures: loss curves and labelled sample grids (matplotlib), because people would rather look than read.

metrics.json names a figure `<prefix><metric>_<group>_cfg<g>`: prefix "" for the run's main world and "clip_" for
the clips beside it, group "seen" / "heldout" (nothing for a world without held-out combinations).
"""

import itertools
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure   # a Figure saves itself without pyplot: no global backend is switched

from . import shapes
from .gpt import apply_rope
from .layout import Plan
from .pipeline import Pipeline
from .world import World
from .image import from_tensor, to_tensor


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 images (peak 255), over the whole set."""
    mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def encode(vq, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or clips (N, T, H, W, 3) -> codes, on the CPU, `batch_size` images at a time."""
    device = next(vq.parameters()).device
    step = max(1, batch_size // (pixels.shape[1] if pixels.ndim == 5 else 1))
    return torch.cat([vq.encode(to_tensor(pixels[i:i + step]).to(device)).cpu()
                      for i in range(0, len(pixels), step)])


@torch.no_grad()
def vq_report(vq, images: np.ndarray, batch_size: int = 256) -> dict:
    """Encode and decode uint8 images (N, H, W, 3) or clips (N, T, H, W, 3): PSNR, codebook usage and the
    reconstructions (for the checker)."""
    device = next(vq.parameters()).device
    codes = encode(vq, images, batch_size)
    step = max(1, batch_size // (images.shape[1] if images.ndim == 5 else 1))
    recon = np.concatenate([from_tensor(vq.decode(codes[i:i + step].to(device)))
                            for i in range(0, len(codes), step)])
    usage = torch.bincount(codes.flatten(), minlength=vq.cfg.codebook_size).gt(0).float().mean().item()
    return {"psnr": psnr(images, recon), "usage": usage, "recon": recon}


@torch.no_grad()
def image_nll(pipe: Pipeline, codes: torch.Tensor, captions: list[str], batch_size: int = 64,
              plans: list[str] | None = None) -> float:
    """Mean negative log-likelihood of the codes given the captions, nats per image token: the generation string
    `BOS caption BOI "h*w" IMG rows.. EOI EOS` teacher-forced through the GPT, averaged over the visual codes.
    plans: each image's true plan, written after its caption (a model trained with plans)."""
    gpt, layout, device = pipe.gpt, pipe.layout, pipe.gpt.lm_head.weight.device
    planned = [[Plan(p)] for p in plans] if plans is not None else [[]] * len(captions)
    total, count = 0.0, 0
    for i in range(0, len(codes), batch_size):
        rows = [layout.encode([c, *p, x], pipe.tokenizer, eos=True)
                for c, p, x in zip(captions[i:i + batch_size], planned[i:i + batch_size], codes[i:i + batch_size])]
        length = max(map(len, rows))
        ids = torch.tensor([r + [layout.pad] * (length - len(r)) for r in rows], device=device)
        logits = gpt(ids[:, :-1])                                                  # (B, T-1, V)
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        visual = layout.is_visual(targets).flatten()
        total, count = total + nll[visual].sum().item(), count + int(visual.sum())
    return total / count


@torch.no_grad()
def attention_maps(gpt, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention weights over one token string ids (1, T), heads averaged: [(T, T)] per layer, row t
    = what position t attends to. One forward records each attention layer's input (a pre-hook); the weights are
    recomputed from the layer's own projections, softmax(q k^T / sqrt(d)) with the causal mask (notebooks 04, 06)."""
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[:3]))
             for i, layer in enumerate(gpt.layers)]
    try:
        gpt(ids)
    finally:
        for hook in hooks:
            hook.remove()
    cfg, T = gpt.config, ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    maps = []
    for i, layer in enumerate(gpt.layers):
        x, cos, sin = inputs[i]                                             # the normed input and rotary tables
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, T, cfg.n_head, cfg.head_dim)             # (1, T, n_head, head_dim)
        k = attn.k_proj(x).view(1, T, cfg.n_kv_head, cfg.head_dim)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # (1, heads, T, hd)
        k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)         # GQA: each kv head serves several
        scores = (q @ k.transpose(-2, -1)).float() / cfg.head_dim ** 0.5
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].mean(0))   # (T, T)
    return maps


def draw(pipe: Pipeline, captions: list[str], batch_size: int = 512, frames: int | None = None,
         **sampling) -> np.ndarray:
    """One image (or clip, with frames) per caption, drawn exactly as a user draws them (Pipeline.draw) -> uint8
    (N, H, W, 3) or (N, T, H, W, 3). Clips go 8x fewer at a time: as many pixels at once."""
    if frames:
        clips = pipe.draw(captions, batch_size=max(1, batch_size // frames), frames=frames, **sampling)
        return np.stack([np.stack([np.asarray(frame) for frame in clip]) for clip in clips])
    return np.stack([np.asarray(image) for image in pipe.draw(captions, batch_size=batch_size, **sampling)])


def answer(pipe: Pipeline, pixels: np.ndarray, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers, one per (image or clip, question), as a user asks for them (Pipeline.answer /
    answer_clip), one batch per distinct question."""
    ask = pipe.answer_clip if pixels.ndim == 5 else pipe.answer
    out = [""] * len(questions)
    for question in dict.fromkeys(questions):
        index = [i for i, q in enumerate(questions) if q == question]
        for i, text in zip(index, ask(list(pixels[index]), question, max_new_tokens=max_new_tokens)):
            out[i] = text
    return out


def key(world: World, *parts) -> str:
    return world.prefix + "_".join(str(p) for p in parts if p != "")


def evaluate(pipe: Pipeline, world: World, out: Path, seed: int = 0, repeats: int = 7, n: int = 256,
             columns: int = 6) -> dict:
    """Every figure of one world (see the module docstring) and its pictures in `out`. repeats: draws per seen
    prompt (world.draw_tasks); n: examples for the VQ and the answers."""
    metrics, cfg = {}, pipe.guidance.cfg_scale
    rng = np.random.default_rng([seed, 4 if world.prefix else 3])
    examples = world.sample(max(16, n // 2) if world.frames else 2 * n, rng, world.vq_split)   # clips: 8x pixels
    report = vq_report(pipe.vq, examples.pixels)
    metrics[key(world, "vq_psnr_db")] = round(report["psnr"], 2)
    metrics[key(world, "codebook_usage")] = round(report["usage"], 3)
    if world.checker:
        metrics[key(world, "vq_recon_checker")] = world.score(report["recon"], examples.targets)["adherence"]

    nll_rng = np.random.default_rng([seed, 6])
    for split in ("train", "heldout"):
        examples = world.sample(min(n, 256), nll_rng, split)
        metrics[key(world, "nll", "seen" if split == "train" else split)] = round(
            image_nll(pipe, encode(pipe.vq, examples.pixels), examples.captions,
                      plans=examples.plans if pipe.layout.has_plans else None), 4)

    checked = {}   # group -> (drawings, captions, targets) at the checkpoint's cfg, for checked.png
    for group, (captions, targets) in world.draw_tasks(repeats).items():
        metrics[key(world, "drawn", group)] = len(captions)
        if pipe.layout.has_plans and world.plans:   # are the plans it writes right, before any drawing?
            generator = torch.Generator(pipe.gpt.lm_head.weight.device).manual_seed(seed)
            written = pipe.write_plans(captions, pipe.sampling, generator)
            metrics[key(world, "plan_agrees", group)] = float(np.mean([world.plan_agrees(p, c)
                                                                       for p, c in zip(written, captions)]))
        for g in (cfg, 1.0):
            drawn = draw(pipe, captions, frames=world.frames, cfg_scale=g, seed=seed)
            scores = world.score(drawn, targets)
            if g == cfg:
                checked[group] = (drawn, captions, targets)
            metrics.update({key(world, name, group, f"cfg{g:g}"): value for name, value in scores.items()})

    tasks, answered = world.answer_tasks(n, rng), {}
    for group, examples in tasks.items():
        items = [(i, q, a) for i, pairs in enumerate(examples.answers) for q, a in pairs]
        pixels = examples.pixels[[i for i, _, _ in items]]
        predicted = answer(pipe, pixels, [q for _, q, _ in items])
        answered[group] = [(i, q, a, p) for (i, q, a), p in zip(items, predicted)]
        rates = world.answer_accuracy(predicted, [a for *_, a in items], [q for _, q, _ in items], pixels)
        metrics.update({key(world, name, group): value for name, value in rates.items()})

    pictures(pipe, world, out, seed, columns, tasks)
    if not world.frames and world.checker:
        checked_picture(world, checked, out / "checked.png", columns, cfg)
    if world.name == "shapes":   # how crisp the seen drawings are
        drawn, _, targets = checked["seen"]
        fill_histogram(drawn, [t[1] for t in targets], out / "fill.png", seed, cfg)
    group = "seen" if "seen" in tasks else next(iter(tasks), None)
    if group is not None and any(q for pairs in tasks[group].answers for q, _ in pairs):   # a world that asks
        answers_picture(world, tasks[group], answered[group], out / "answers.png")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def pictures(pipe: Pipeline, world: World, out: Path, seed: int, columns: int, tasks: dict) -> None:
    """samples.png / samples_cfg1.png (the world's showcase prompts, a row each; the last rows held out),
    clips.png for clips, and captions.png: greedy captions of fresh images, green where right."""
    prompts, held = world.showcase()
    cfg = pipe.guidance.cfg_scale
    if world.frames:   # one clip per row, its frames across
        clips = draw(pipe, prompts, frames=world.frames, seed=seed + 1)
        image_grid(clips.reshape(-1, *clips.shape[2:]), prompts, out / "clips.png", clips.shape[1],
                   title=f"text -> clip, cfg {cfg:g}: the {clips.shape[1]} frames of one clip per row")
        return
    if prompts:
        note = f" (last {held} prompts held out of training)" if held else ""
        for g, name in ((cfg, "samples.png"), (1.0, "samples_cfg1.png")):
            images = draw(pipe, [p for p in prompts for _ in range(columns)], cfg_scale=g, seed=seed + 1)
            image_grid(images, prompts, out / name, columns, title=f"text -> image, cfg {g:g}{note}")
    group = "heldout" if world.finite else "seen"   # a folder's training images are not fresh: show held-out ones
    examples = tasks.get(group) or world.sample(12, np.random.default_rng([seed, 8]), "heldout")
    pixels = examples.pixels[:12]
    captions = answer(pipe, pixels, [""] * len(pixels))
    correct = None
    if group in tasks:
        correct = [world.answer_accuracy([c], [e], [""], x[None])["caption_accuracy"] == 1.0
                   for c, e, x in zip(captions, examples.captions[:12], pixels)]
    captioned_grid(pixels, captions, correct, out / "captions.png", title="image -> text (greedy): the GPT's "
                   f"captions of {'held-out' if world.finite else 'fresh'} images")


def checked_picture(world: World, checked: dict, path: Path, columns: int, cfg: float) -> None:
    """checked.png: drawings read back by the world's checker, a row per category (world.category) and group,
    the prompt above each image and a green (right) or red (wrong) border; a row's label gives its rate over all of
    its drawings. A row shows one drawing of each of its first `columns` distinct prompts."""
    rows = []
    for group, (drawn, captions, targets) in checked.items():
        right = world.judge(drawn, targets)
        by_category: dict[str, list[int]] = {}
        for i, target in enumerate(targets):
            by_category.setdefault(world.category(target), []).append(i)
        for category, index in by_category.items():
            first, prompts = [], set()   # the first drawing of each prompt, then the others
            for i in index:
                if captions[i] not in prompts:
                    prompts.add(captions[i])
                    first.append(i)
            shown = (first + [i for i in index if i not in first])[:columns]
            name = category.replace("_", " ") + (" (held out)" if group == "heldout" else "")
            label = f"{name}\n{np.mean([right[i] for i in index]):.0%} of {len(index)}"
            rows.append((label, [(drawn[i], captions[i], right[i]) for i in shown]))
    if not rows:
        return
    width, height = 1.45 * columns + 1.3, 1.85 * len(rows) + 0.6
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    fig.subplots_adjust(left=1.3 / width, right=0.99, bottom=0.01, top=1 - 0.7 / height, wspace=0.08, hspace=0.45)
    for (label, cells), row in zip(rows, axes):
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        for ax, cell in itertools.zip_longest(row, cells):
            ax.set_xticks([]), ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            image, caption, ok = cell
            ax.imshow(image, interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(caption, 27)), fontsize=6.5, pad=2)
            for spine in ax.spines.values():
                spine.set(color="tab:green" if ok else "tab:red", linewidth=3)
    fig.suptitle(f"text -> image, cfg {cfg:g}, read back by the checker: green = right, red = wrong", fontsize=10)
    fig.savefig(path, dpi=110)


def answers_picture(world: World, examples, answered: list[tuple], path: Path, images: int = 8) -> None:
    """answers.png: fresh images with every question asked about them and the model's greedy answer, green where
    it is right, red with the true answer where not (the caption is the empty question)."""
    columns = 4
    rows = math.ceil(images / columns)
    fig = Figure(figsize=(2.9 * columns, 4.1 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k >= len(examples.pixels):
            ax.axis("off")
            continue
        ax.imshow(examples.pixels[k], interpolation="nearest")
        lines = [(q, a, p) for i, q, a, p in answered if i == k]
        y = -0.04
        for question, truth, predicted in lines:
            ok = world.answer_accuracy([predicted], [truth], [question], examples.pixels[k][None])
            ok = ok.get("qa_accuracy" if question else "caption_accuracy", 0.0) == 1.0
            text = textwrap.wrap(f"{question or 'caption:'} {predicted}" + ("" if ok else f" (true: {truth})"), 44)
            ax.text(0, y, "\n".join(text), transform=ax.transAxes, va="top", fontsize=7,
                    color="tab:green" if ok else "tab:red")
            y -= 0.075 * len(text) + 0.02
    fig.suptitle("image -> text (greedy): questions about fresh images and the GPT's answers "
                 "(green = right; red, with the true answer)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.24, wspace=0.15, hspace=0.75)
    fig.savefig(path, dpi=110)


def fill_histogram(drawn: np.ndarray, kinds_drawn: list[str], path: Path, seed: int, cfg: float) -> None:
    """fill.png: per shape, how much of its bounding box a drawn shape fills (shapes.fill) next to the same
    number of freshly rendered ones, with shapes.FILL_RANGES shaded: crisp drawings pile up where renders do."""
    rendered, _, attrs = shapes.sample_shapes(len(drawn), np.random.default_rng([seed, 9]))
    fig = Figure(figsize=(12, 3.2))
    bins = np.linspace(0.3, 1.0, 36)
    for ax, name in zip(fig.subplots(1, len(shapes.FILL_RANGES)), shapes.FILL_RANGES):
        lo, hi = shapes.FILL_RANGES[name]
        ax.axvspan(lo, hi, color="tab:green", alpha=0.12)
        for images, kinds, label in ((rendered, [a[1] for a in attrs], "rendered"), (drawn, kinds_drawn, "drawn")):
            fills = [f for x, k in zip(images, kinds) if k == name and (f := shapes.fill(x)) is not None]
            ax.hist(np.clip(fills, bins[0], bins[-1]), bins=bins, alpha=0.6, label=f"{label} ({len(fills)})")
        ax.set(title=f"{name}s", xlabel="fill of bounding box")
        ax.legend(fontsize=8)
    fig.suptitle(f"text -> image fill, cfg {cfg:g} (shaded: the crisp range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_losses(histories: dict[str, list[dict]], path: Path, keys: dict[str, str]) -> None:
    """One panel per stage: histories[name] is fit()'s history, keys[name] the logged value to plot."""
    fig = Figure(figsize=(5 * len(histories), 3.6))
    axes = fig.subplots(1, len(histories))
    for ax, (name, history) in zip(np.atleast_1d(axes), histories.items()):
        ax.plot([h["step"] for h in history], [h[keys[name]] for h in history], lw=1)
        ax.set(title=f"{name}: {keys[name]}", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def image_grid(images: np.ndarray, labels: list[str], path: Path, columns: int, title: str = "") -> None:
    """A labelled grid of uint8 images (N, H, W, 3): one label per row of `columns` images, left of the row."""
    rows = math.ceil(len(images) / columns)
    label_width = 0.06 * max((len(label) for label in labels), default=0) + 0.2   # inches at fontsize 8
    width, height = 1.1 * columns + label_width + 0.1, 1.1 * rows + (0.45 if title else 0.1)
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.subplots_adjust(left=label_width / width, right=1 - 0.05 / width, bottom=0.05 / height,
                        top=1 - (0.4 if title else 0.05) / height, wspace=0.06, hspace=0.06)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
        else:
            ax.axis("off")
        if k % columns == 0 and k // columns < len(labels):
            ax.set_ylabel(labels[k // columns], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def captioned_grid(images: np.ndarray, captions: list[str], correct: list[bool] | None, path: Path, columns: int = 4,
                   title: str = "") -> None:
    """Images with the model's caption under each, green where it is right and red where not (black: no
    ground truth to compare with)."""
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.9 * columns, 2.25 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[k], interpolation="nearest")
        ax.set_xlabel("\n".join(textwrap.wrap(captions[k], 18)[:3]), fontsize=8,
                      color="black" if correct is None else "tab:green" if correct[k] else "tab:red")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
