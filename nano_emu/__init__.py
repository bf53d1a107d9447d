"""nano_emu: Emu3-style token-based multimodal generation, from scratch in PyTorch.

Images (and video) become discrete codes through a VQ tokenizer (vq.py), codes and text are written into one
token string (layout.py), one decoder-only transformer models that string (gpt.py), and an autoregressive
sampler with classifier-free guidance and grid constraints draws from it (sampler.py).
"""

from .chameleon import load_chameleon
from .emu3 import load_emu3
from .llamagen import load_llamagen

__all__ = ["load_chameleon", "load_emu3", "load_llamagen"]
