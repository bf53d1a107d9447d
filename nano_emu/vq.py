"""The vision tokenizer: pixels <-> discrete codes. Emu3's (images and video) and LlamaGen's (images) are presets.

A taming-transformers VQ-GAN: res blocks, single-head attention at the lowest resolution, a 2x resample between
levels. Two families are switches of the same modules (table in docs/families.md):
- Emu3 (`VQConfig.emu3()`): MoVQ's SpatialNorm in the decoder (norms conditioned on the quantised codes), and a
  causal temporal stack on the 4-channel latent (4x temporal compression), so one code grid covers 4 frames and an
  image is a clip of 4 identical frames. Module names follow the released `Emu3-VisionTokenizer` state dict, so its
  checkpoint loads with an identity map (emu3.py maps the transformers `-hf` names).
- LlamaGen (`VQConfig.llamagen(16)` / `(8)`): `temporal_factor=1` (no temporal axis), plain GroupNorm decoder, a
  256-wide latent projected by 1x1 convs to 8-wide codes in an L2-normalised codebook (llamagen.py maps its names).
- Chameleon / Anole (`VQConfig.chameleon()`): the LlamaGen structure with attention only in the mid blocks and a
  plain (not normalised) codebook of 8192 codes of width 256; its taming names are ours (chameleon.py). Its -hf
  conversion drops the decoder: such a VQModel is built with `decoder=False` and can only encode.

    cfg = VQConfig.emu3()                 # or VQConfig.tiny() for CPU toys
    vq = VQModel(cfg).eval()
    codes = vq.encode(images)             # (B, 3, H, W) in [-1, 1]  -> (B, H/8, W/8) int64
    codes = vq.encode(video)              # (B, T, 3, H, W), T % 4 == 0 -> (B, T/4, H/8, W/8)
    pixels = vq.decode(codes)             # (B, h, w) -> (B, 3, 8h, 8w);  (B, t, h, w) -> (B, 4t, 3, 8h, 8w)
    out = vq(images)                      # training: VQOutput(recon, codes, loss, losses); out.loss.backward()

Emu3 images take an exact shortcut: every temporal op is causal and every 2-D op acts per frame, so the 4 repeated
input frames give one 2-D encoding (run once, then repeated), and the returned frame 0 needs only frame 0 of the 2-D
decoder. The released 4-frame path is the video path on a clip of 4 copies; tests show both agree. What only
training needs (its initialisation, dead-code restarts, usage counts) lives in train.py; the building blocks
(res blocks, attention, resampling, SpatialNorm, the temporal stack) in vq_blocks.py.

References: Emu3 (arXiv 2409.18869) and baaivision/Emu3 `emu3/tokenizer/modeling_emu3visionvq.py`; MoVQ
(arXiv 2209.09002) for SpatialNorm; VQ-VAE (arXiv 1711.00937) for the losses and the straight-through estimator;
LlamaGen (arXiv 2406.06525, FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`) for the
low-dimensional, L2-normalised codebook.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .vq_blocks import CausalConv3d, GroupNorm, Level, Mid, TemporalResnetBlock, TimeConv, make_norm


# ---------------------------------------------------------------------------------------------------------------
# config, encoder, quantizer, decoder, model


@dataclass
class VQConfig:
    ch: int = 256  # base width; level l has ch * ch_mult[l] channels
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry, a 2x down/upsample between levels
    num_res_blocks: int = 2  # per encoder level (decoder levels get one more, as taming) and per temporal stack
    attn_levels: tuple[int, ...] = (3,)  # levels with attention ("attn_resolutions" in the released config)
    embed_dim: int = 4  # code vector width
    codebook_size: int = 32768
    temporal_factor: int = 4  # input frames per code frame, a power of 2 (one strided time conv per factor 2);
    #                           1: no temporal axis at all (LlamaGen): images only, no temporal layers
    z_channels: int | None = None  # encoder output / decoder input width; None: embed_dim (Emu3). LlamaGen: 256,
    #                                with 1x1 quant convs to and from the embed_dim-wide codes
    spatial_norm: bool = True  # MoVQ's SpatialNorm in the decoder (Emu3); False: GroupNorm as taming (LlamaGen)
    in_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups; 32 in the release, fewer for narrow toy models
    l2_norm: bool = False  # LlamaGen: L2-normalise latents and codebook, i.e. nearest code by cosine similarity
    beta: float = 0.25  # commitment loss weight (training only)

    def __post_init__(self):
        self.ch_mult, self.attn_levels = tuple(self.ch_mult), tuple(self.attn_levels)  # lists from JSON configs
        if self.temporal_factor < 1 or self.temporal_factor & (self.temporal_factor - 1):
            raise ValueError(f"temporal_factor must be a power of 2, got {self.temporal_factor}")
        self.z_channels = self.z_channels or self.embed_dim
        if self.temporal_factor > 1 and self.z_channels != self.embed_dim:  # Emu3's causal quant convs keep the width
            raise ValueError(f"a temporal VQ needs z_channels == embed_dim, got {self.z_channels} and {self.embed_dim}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"level widths {bad} are not divisible by norm_groups={self.norm_groups}")
        if any(not 0 <= level < len(self.ch_mult) for level in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} name levels that ch_mult {self.ch_mult} does not have "
                             f"(it has levels 0-{len(self.ch_mult) - 1})")

    @property
    def spatial_factor(self) -> int:  # pixels per code along H and W: one 2x downsample between levels
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def emu3(cls) -> "VQConfig":
        """BAAI/Emu3-VisionTokenizer: 270.7M parameters, 8x8 pixels x 4 frames per code, 32768 codes of width 4."""
        return cls(ch=256, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(3,), embed_dim=4,
                   codebook_size=32768, temporal_factor=4, norm_groups=32, l2_norm=False)

    @classmethod
    def llamagen(cls, downsample: int = 16) -> "VQConfig":
        """FoundationVision/LlamaGen vq_ds16_c2i.pt (VQ-16: 16x16 pixels per code, 71.9M parameters) or vq_ds8_c2i.pt
        (VQ-8: 8x8, 70.1M): 16384 codes of width 8, L2-normalised; attention only at the lowest resolution."""
        ch_mult = {16: (1, 1, 2, 2, 4), 8: (1, 2, 2, 4)}[downsample]
        return cls(ch=128, ch_mult=ch_mult, num_res_blocks=2, attn_levels=(len(ch_mult) - 1,), embed_dim=8,
                   codebook_size=16384, temporal_factor=1, z_channels=256, spatial_norm=False, norm_groups=32,
                   l2_norm=True)

    @classmethod
    def chameleon(cls) -> "VQConfig":
        """Chameleon's / Anole's VQGAN (tokenizer/vqgan.yaml): 512 px -> 32x32 codes of 8192, width 256, no L2
        normalisation, attention only in the mid blocks (attn_resolutions [])."""
        return cls(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(), embed_dim=256,
                   codebook_size=8192, temporal_factor=1, z_channels=256, spatial_norm=False, norm_groups=32,
                   l2_norm=False)

    @classmethod
    def tiny(cls, **overrides) -> "VQConfig":
        """The same blocks, narrow (0.8M parameters): 64x64 toy images -> 8x8 codes of width 4 from 256, L2-normalised
        as in LlamaGen. On the shapes world 256 codes reconstruct as well as 512 or 1024 and each is used far
        more often, which the GPT learns faster (docs/tiny_model.md has the ablations). train_tiny.py drops the
        time axis (temporal_factor=1) for image-only runs (an image needs none); --video keeps it and widens the
        code to 8 (a code frame holds 4 frames of motion)."""
        kw = dict(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, embed_dim=4,
                  codebook_size=256, temporal_factor=4, norm_groups=4, l2_norm=True)
        kw = {**kw, **overrides}
        kw.setdefault("attn_levels", (len(kw["ch_mult"]) - 1,))   # attention in the lowest level, as Emu3's
        return cls(**kw)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, g, n = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([cfg.ch] + widths)[l], widths[l], cfg.num_res_blocks, l in cfg.attn_levels, g,
                  resample="down" if l < n - 1 else None)
            for l in range(n))
        self.mid = Mid(widths[-1], g)
        self.norm_out = GroupNorm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)
        n_time, temporal = int(math.log2(cfg.temporal_factor)), cfg.temporal_factor > 1   # none without a time axis
        self.time_conv = nn.ModuleList(TimeConv(cfg.embed_dim, up=False) for _ in range(n_time))
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(cfg.embed_dim)
                                              for _ in range(cfg.num_res_blocks if temporal else 0)))

    def frames(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, C, H/f, W/f), each frame on its own
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def temporal(self, z: Tensor) -> Tensor:  # (B, C, T, h, w) -> (B, C, T/temporal_factor, h, w)
        for conv in self.time_conv:
            z = F.silu(conv(z))
        return self.time_res_stack(z)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, g, n, C = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult), cfg.embed_dim
        temporal = cfg.temporal_factor > 1
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(C) for _ in range(cfg.num_res_blocks if temporal
                                                                                      else 0)))
        self.time_conv = nn.ModuleList(TimeConv(C, up=True) for _ in range(int(math.log2(cfg.temporal_factor))))
        zq = C if cfg.spatial_norm else None   # the width of SpatialNorm's condition, None: plain GroupNorm
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g, zq_channels=zq)
        # up[l] is indexed by level as in Emu3's release (LlamaGen numbers them the other way, see llamagen.py), and
        # run from the deepest level (l = n-1) to l = 0; level l takes the width of level l+1 and upsamples at its
        # end unless it is the full resolution
        self.up = nn.ModuleList(
            Level(widths[min(l + 1, n - 1)], widths[l], cfg.num_res_blocks + 1, l in cfg.attn_levels, g,
                  zq_channels=zq, resample="up" if l > 0 else None)
            for l in range(n))
        self.norm_out = make_norm(widths[0], g, zq)
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def temporal(self, z: Tensor, zq: Tensor) -> tuple[Tensor, Tensor]:  # (B, C, t, h, w) x2 -> (B, C, 4t, h, w) x2
        # Emu3 sends the post-quant latent and the raw code vectors through the same temporal layers as one
        # batch, so SpatialNorm's condition zq is upsampled in time too (BatchNorm in training sees both)
        x = self.time_res_stack(torch.cat([z, zq]))  # (2B, C, t, h, w)
        for conv in self.time_conv:
            x = F.silu(conv(x))
        z, zq = x.chunk(2)
        return z, zq

    def frames(self, z: Tensor, zq: Tensor | None = None) -> Tensor:  # (N, C, h, w) x2 -> (N, 3, H, W) per frame
        h = self.mid(self.conv_in(z), zq)
        for level in reversed(self.up):
            h = level(h, zq)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class VectorQuantizer(nn.Module):
    """Nearest codebook vector under squared L2 distance (cosine similarity when l2_norm), the VQ-VAE codebook and
    commitment losses, and the straight-through estimator."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.l2_norm = cfg.l2_norm

    def codebook(self) -> Tensor:  # (K, C)
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, codes: Tensor) -> Tensor:  # (...) -> (..., C)
        return F.embedding(codes, self.codebook())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, C, T, h, w = z.shape
        z = z.permute(0, 2, 3, 4, 1)  # (B, T, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat, e = z.reshape(-1, C), self.codebook()  # (N, C), (K, C)
        # |z|^2 + |e|^2 - 2 z.e, written as in the release so that near-ties break the same way
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # (N, K)
        codes = dist.argmin(1).view(B, T, h, w)
        z_q = F.embedding(codes, e)  # (B, T, h, w, C)
        codebook_loss = F.mse_loss(z_q, z.detach())  # pulls the chosen codes towards the encoder outputs
        commit_loss = F.mse_loss(z, z_q.detach())  # keeps the encoder close to its codes
        z_q = z + (z_q - z).detach()  # straight-through: the forward pass sees z_q, gradients flow to z unchanged
        return z_q.permute(0, 4, 1, 2, 3), codes, codebook_loss, commit_loss  # (B, C, T, h, w), (B, T, h, w)



class VQOutput(NamedTuple):
    recon: Tensor  # reconstruction, shaped like the input, roughly in [-1, 1] (not clamped)
    codes: Tensor  # (B, h, w) for images, (B, t, h, w) for video
    loss: Tensor  # recon_loss + codebook_loss + beta * commit_loss: the scalar to backpropagate
    losses: dict[str, Tensor]  # the three terms, detached, for logging


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        # decoder=False: an encoder-only VQ, for checkpoints released without the decoder (Chameleon's -hf folders)
        self.decoder = Decoder(cfg) if decoder else None
        self.quantize = VectorQuantizer(cfg)
        if cfg.temporal_factor > 1:   # Emu3: causal convs over the current and the 2 previous code frames
            self.quant_conv = CausalConv3d(cfg.embed_dim, cfg.embed_dim, (3, 1, 1))
            self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.embed_dim, (3, 1, 1))
        else:   # LlamaGen: per-pixel projections between the wide latent and the narrow codes
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def latent(self, x: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) or (B, T, 3, H, W) -> continuous latent before quantisation (B, C, t, h, w)."""
        is_image, tf = self._check_pixels(x), self.cfg.temporal_factor
        x = x.to(self.encoder.conv_in.weight.dtype)
        if tf == 1:  # LlamaGen: one 2-D encoding, kept as a single code frame
            return self.quant_conv(self.encoder.frames(x)).unsqueeze(2)  # (B, C, 1, h, w)
        if is_image:  # Emu3's exact shortcut for a clip of 4 identical frames
            z = self.encoder.frames(x)  # (B, C, h, w): what each of the 4 repeated frames would give
            z = z.unsqueeze(2).expand(-1, -1, tf, -1, -1)  # (B, C, 4, h, w)
        else:
            B, T = x.shape[:2]
            z = self.encoder.frames(x.flatten(0, 1))  # (B*T, C, h, w)
            z = z.view(B, T, *z.shape[1:]).transpose(1, 2)  # (B, C, T, h, w)
        return self.quant_conv(self.encoder.temporal(z))  # (B, C, T/4, h, w)

    def pixels(self, z_q: Tensor, frame0: bool = False) -> Tensor:
        """Code vectors (B, C, t, h, w) -> video (B, 4t, 3, H, W), or only its frame 0 (B, 3, H, W) if frame0."""
        if self.cfg.temporal_factor == 1:  # LlamaGen (or a 2-D MoVQ): one 2-D decoding of the single code frame
            zq = z_q[:, :, 0] if self.cfg.spatial_norm else None   # SpatialNorm's condition, when there is one
            return self.decoder.frames(self.post_quant_conv(z_q[:, :, 0]), zq)  # (B, 3, H, W)
        z, zq = self.decoder.temporal(self.post_quant_conv(z_q), z_q)  # (B, C, 4t, h, w) each
        if frame0:  # causal time + per-frame 2-D decoder: frame 0 needs nothing from frames 1..3
            return self.decoder.frames(z[:, :, 0], zq[:, :, 0])  # (B, 3, H, W)
        B, T = z.shape[0], z.shape[2]
        z, zq = (t.transpose(1, 2).flatten(0, 1) for t in (z, zq))  # (B*T, C, h, w)
        x = self.decoder.frames(z, zq)  # (B*T, 3, H, W)
        return x.view(B, T, *x.shape[1:])  # (B, T, 3, H, W)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> codes (B, H/f, W/f); video (B, T, 3, H, W) -> codes (B, T/4, H/f, W/f).
        Pixels in [-1, 1]."""
        codes = self.quantize(self.latent(x))[1]  # (B, t, h, w)
        return codes[:, 0] if x.ndim == 4 else codes

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> image (B, 3, H, W), frame 0 of the decoded clip as released; codes (B, t, h, w) ->
        video (B, 4t, 3, H, W)."""
        is_image = self._check_codes(codes)
        if self.decoder is None:
            raise ValueError("this VQ has no decoder: its checkpoint was released without one (Chameleon's -hf "
                             "conversion drops it); load a folder that has it (Anole's, or the original vqgan.ckpt)")
        z_q = self.quantize.lookup(codes.unsqueeze(1) if is_image else codes).permute(0, 4, 1, 2, 3)  # (B, C, t, h, w)
        return self.pixels(z_q, frame0=is_image)

    def forward(self, x: Tensor) -> VQOutput:
        """Training step on images (B, 3, H, W) or video (B, T, 3, H, W): L2 reconstruction + VQ losses."""
        z_q, codes, codebook_loss, commit_loss = self.quantize(self.latent(x))
        is_image = x.ndim == 4
        recon = self.pixels(z_q, frame0=is_image)
        recon_loss = F.mse_loss(recon, x.to(recon.dtype))
        loss = recon_loss + codebook_loss + self.cfg.beta * commit_loss
        losses = {"recon": recon_loss.detach(), "codebook": codebook_loss.detach(), "commit": commit_loss.detach()}
        return VQOutput(recon, codes[:, 0] if is_image else codes, loss, losses)

    def _check_pixels(self, x: Tensor) -> bool:
        c, tf, f = self.cfg.in_channels, self.cfg.temporal_factor, self.cfg.spatial_factor
        if x.ndim not in (4, 5):
            raise ValueError(f"expected images (B, {c}, H, W) or video (B, T, {c}, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float pixels in [-1, 1], got dtype {x.dtype}")
        if x.shape[-3] != c:
            raise ValueError(f"expected {c} channels in dim {x.ndim - 3}, got shape {tuple(x.shape)}")
        if x.ndim == 5 and tf == 1:
            raise ValueError(f"this VQ has no temporal axis (temporal_factor=1): expected images (B, {c}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.ndim == 5 and x.shape[1] % tf:
            raise ValueError(f"video frames must be a multiple of temporal_factor={tf}, got T={x.shape[1]}")
        H, W = x.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"H and W must be positive multiples of spatial_factor={f}, got {H}x{W}"
                             " (resize first, e.g. with nano_emu.image.smart_resize)")
        return x.ndim == 4

    def _check_codes(self, codes: Tensor) -> bool:
        K = self.cfg.codebook_size
        if codes.ndim not in (3, 4) or (codes.ndim == 4 and self.cfg.temporal_factor == 1):
            raise ValueError("expected codes (B, h, w) for images or (B, t, h, w) for video, "
                             f"got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in [0, {K}), got min {codes.min().item()} and max {codes.max().item()}")
        return codes.ndim == 3
