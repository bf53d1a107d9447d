"""What a tiny run reports, measured by the shapes world's deterministic checker (data.classify).

- VQ: reconstruction PSNR and codebook usage on fresh images;
- text -> image: prompt adherence (colour, shape and position all right) of generated images, for seen and
  held-out (colour, shape, position) triples, with CFG and without (cfg 1);
- image -> text: caption accuracy on fresh images (the greedy caption must name all three attributes right);
- pictures: loss curves and labelled sample grids (matplotlib), because people would rather look than read.
"""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only: works on a headless machine
import matplotlib.pyplot as plt
import numpy as np
import torch

from . import data
from .layout import Layout
from .sampler import generate_image, generate_text


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 images (peak 255), over the whole set."""
    mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def vq_report(vq, images: np.ndarray, batch_size: int = 256) -> dict:
    """Encode and decode uint8 images (N, H, W, 3): PSNR, codebook usage, checker accuracy of reconstructions."""
    device = next(vq.parameters()).device
    codes = torch.cat([vq.encode(data.to_tensor(images[i:i + batch_size]).to(device))
                       for i in range(0, len(images), batch_size)])
    recon = np.concatenate([data.from_tensor(vq.decode(codes[i:i + batch_size]))
                            for i in range(0, len(codes), batch_size)])
    usage = torch.bincount(codes.flatten(), minlength=vq.cfg.codebook_size).gt(0).float().mean().item()
    return {"psnr": psnr(images, recon), "usage": usage, "recon": recon}


@torch.no_grad()
def draw(gpt, vq, layout: Layout, tokenizer, captions: list[str], cfg_scale: float, seed: int,
         batch_size: int = 64, **sampling) -> np.ndarray:
    """Generate one image per caption -> uint8 (N, H, W, 3). The unconditional branch is the empty caption,
    which is what the GPT saw when training dropped the caption."""
    device = next(gpt.parameters()).device
    h = w = data.IMAGE_SIZE // vq.cfg.spatial_factor
    generator = torch.Generator(device).manual_seed(seed)
    images = []
    for i in range(0, len(captions), batch_size):
        chunk = captions[i:i + batch_size]
        prompts = [layout.generation_prompt(c, h, w, tokenizer) for c in chunk]
        negative = [layout.generation_prompt("", h, w, tokenizer)] * len(chunk)
        _, codes = generate_image(gpt, layout, prompts, h, w, negative_prompts=negative, cfg_scale=cfg_scale,
                                  generator=generator, **sampling)
        images.append(data.from_tensor(vq.decode(codes.to(device))))
    return np.concatenate(images)


@torch.no_grad()
def caption_images(gpt, vq, layout: Layout, tokenizer, images: np.ndarray, batch_size: int = 128,
                   max_new_tokens: int = 48) -> list[str]:
    """Greedy captions for uint8 images (N, H, W, 3), with visual and image-structure tokens masked out."""
    device = next(gpt.parameters()).device
    text_only = torch.ones(gpt.config.vocab_size, dtype=torch.bool, device=device)
    text_only[layout.first_visual:] = False
    text_only[[layout.pad, layout.bos, layout.img, layout.boi, layout.eoi, layout.eol, layout.eof]] = False
    captions = []
    for i in range(0, len(images), batch_size):
        codes = vq.encode(data.to_tensor(images[i:i + batch_size]).to(device)).cpu()
        prompts = [layout.understanding_prompt(c, "", tokenizer) for c in codes]
        answers = generate_text(gpt, layout, prompts, max_new_tokens=max_new_tokens, allowed=text_only)
        captions += [tokenizer.decode(a) for a in answers]
    return captions


def adherence(images: np.ndarray, attrs: list) -> float:
    return data.score(images, attrs)["all"]


def caption_accuracy(captions: list[str], attrs: list) -> float:
    return float(np.mean([data.parse_caption(c) == tuple(a) for c, a in zip(captions, attrs)]))


def plot_losses(histories: dict[str, list[dict]], path: Path, keys: dict[str, str]) -> None:
    """One panel per stage: histories[name] is fit()'s history, keys[name] the logged value to plot."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.6))
    for ax, (name, history) in zip(np.atleast_1d(axes), histories.items()):
        ax.plot([h["step"] for h in history], [h[keys[name]] for h in history], lw=1)
        ax.set(title=f"{name}: {keys[name]}", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images: np.ndarray, labels: list[str], path: Path, columns: int, title: str = "") -> None:
    """A labelled grid of uint8 images (N, H, W, 3): one label per row of `columns` images."""
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.25 * columns + 2.2, 1.25 * rows + 0.4), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
