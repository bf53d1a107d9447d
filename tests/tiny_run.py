"""A tiny run's folder in seconds: random (untrained) models saved with the metadata train_tiny.py writes, for tests
of what loads, what is refused and what sample.py writes. (tests/test_train_tiny.py trains real ones.)"""

from dataclasses import asdict
from pathlib import Path

import torch

from nano_emu import shapes
from nano_emu.checkpoint import VQ_HASH_KEY, save_checkpoint, weights_hash
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.tiny import make_tokenizer
from nano_emu.vq import VQConfig, VQModel


def write_run(folder, seed: int = 0, video: bool = False, record_vq: bool = True, gpt_meta: dict | None = None,
              vq_meta: dict | None = None) -> Path:
    """vq.safetensors + gpt.safetensors of a --quick-sized run (random weights from `seed`). record_vq False writes
    a GPT from before the VQ hash was recorded; gpt_meta / vq_meta replace entries of the metadata (None deletes)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    vq = VQModel(VQConfig.tiny(temporal_factor=4 if video else 1, embed_dim=8 if video else 4))
    tokenizer, spec = make_tokenizer("words", shapes.vocabulary())
    layout = Layout.tiny(vq.cfg.codebook_size, text_vocab=tokenizer.n_vocab)
    gpt = GPT(GPTConfig.tiny(layout.vocab_size, dim=64, n_layer=2, intermediate_size=160))
    meta = {"kind": "vq", "config": asdict(vq.cfg), "step": 40, "steps": 40, "history": []}
    save_checkpoint(folder / "vq.safetensors", vq.state_dict(), _edit(meta, vq_meta))
    meta = {"kind": "gpt", "config": asdict(gpt.config), "layout": asdict(layout), "tokenizer": spec,
            "image_size": shapes.IMAGE_SIZE, "sampling": {"cfg_scale": 2.0, "temperature": 1.0, "top_k": None},
            "step": 40, "steps": 40, "history": []}
    if record_vq:
        meta[VQ_HASH_KEY] = weights_hash(vq.state_dict())
    save_checkpoint(folder / "gpt.safetensors", gpt.state_dict(), _edit(meta, gpt_meta))
    return folder


def _edit(meta: dict, changes: dict | None) -> dict:
    meta = {**meta, **(changes or {})}
    return {k: v for k, v in meta.items() if v is not None}
