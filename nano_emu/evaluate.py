"""What a tiny run reports, measured by the shapes world's deterministic checker (data.classify).

- VQ: reconstruction PSNR and codebook usage on fresh images;
- text -> image: prompt adherence (colour, shape and position all right) of generated images, for seen and
  held-out (colour, shape, position) triples, with CFG and without (cfg 1);
- image -> text: caption accuracy on fresh images (the greedy caption must name all three attributes right);
- clips (train_tiny.py --video): the same for moving shapes, where the third attribute is the direction of motion;
- pictures: loss curves and labelled sample grids (matplotlib), because people would rather look than read.
"""

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure   # a Figure saves itself without pyplot: no global backend is switched

from . import data
from .pipeline import Pipeline


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 images (peak 255), over the whole set."""
    mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def vq_report(vq, images: np.ndarray, batch_size: int = 256) -> dict:
    """Encode and decode uint8 images (N, H, W, 3) or clips (N, T, H, W, 3): PSNR, codebook usage and the
    reconstructions (for the checker)."""
    device = next(vq.parameters()).device
    codes = torch.cat([vq.encode(data.to_tensor(images[i:i + batch_size]).to(device))
                       for i in range(0, len(images), batch_size)])
    recon = np.concatenate([data.from_tensor(vq.decode(codes[i:i + batch_size]))
                            for i in range(0, len(codes), batch_size)])
    usage = torch.bincount(codes.flatten(), minlength=vq.cfg.codebook_size).gt(0).float().mean().item()
    return {"psnr": psnr(images, recon), "usage": usage, "recon": recon}


def draw(pipe: Pipeline, captions: list[str], batch_size: int = 512, **sampling) -> np.ndarray:
    """One image per caption, drawn exactly as a user draws them (Pipeline.draw) -> uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(image) for image in pipe.draw(captions, batch_size=batch_size, **sampling)])


def draw_clips(pipe: Pipeline, captions: list[str], frames: int = data.VIDEO_FRAMES, batch_size: int = 64,
               **sampling) -> np.ndarray:
    """One clip per caption, drawn as a user draws them (Pipeline.draw with frames) -> uint8 (N, T, H, W, 3).
    64 clips of 8 frames decode as many pixels at once as 512 images."""
    clips = pipe.draw(captions, batch_size=batch_size, frames=frames, **sampling)
    return np.stack([np.stack([np.asarray(frame) for frame in clip]) for clip in clips])


def caption_clips(pipe: Pipeline, clips: np.ndarray, max_new_tokens: int = 48) -> list[str]:
    """Greedy captions of uint8 clips (N, T, H, W, 3), as a user asks for them (Pipeline.answer_clip)."""
    return pipe.answer_clip(list(clips), max_new_tokens=max_new_tokens)


def caption_images(pipe: Pipeline, images: np.ndarray, max_new_tokens: int = 48) -> list[str]:
    """Greedy captions of uint8 images (N, H, W, 3), exactly as a user asks for them (Pipeline.answer)."""
    return pipe.answer(list(images), max_new_tokens=max_new_tokens)


def adherence(images: np.ndarray, attrs: list) -> float:
    return data.score(images, attrs)["all"]


def caption_accuracy(captions: list[str], attrs: list, video: bool = False) -> float:
    parse = data.parse_video_caption if video else data.parse_caption
    return float(np.mean([parse(c) == tuple(a) for c, a in zip(captions, attrs)]))


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


def captioned_grid(images: np.ndarray, captions: list[str], correct: list[bool], path: Path, columns: int = 4,
                   title: str = "") -> None:
    """Images with the model's caption under each, green where the checker agrees with it and red where not."""
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.9 * columns, 2.25 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[k], interpolation="nearest")
        words = captions[k].split(" ")   # two lines: "a red circle" / "in the top left"
        ax.set_xlabel(" ".join(words[:3]) + "\n" + " ".join(words[3:]), fontsize=8,
                      color="tab:green" if correct[k] else "tab:red")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
