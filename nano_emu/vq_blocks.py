"""The VQ tokenizer's building blocks: 2-D res blocks, attention and resampling per frame, MoVQ's SpatialNorm, and
the causal temporal stack of Emu3's video tokenizer. vq.py assembles them into the encoder and decoder.

Module and parameter names follow the released Emu3-VisionTokenizer state dict (so its checkpoint loads with an
identity map); LlamaGen's and Chameleon's VQGANs use the same blocks with SpatialNorm and the temporal stack off.
"""

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# 2-D building blocks, applied to each frame independently


class GroupNorm(nn.GroupNorm):
    """GroupNorm (eps 1e-6) that takes and ignores SpatialNorm's zq, so encoder and decoder blocks share one forward."""

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        return super().forward(x)


class SpatialNorm(nn.Module):
    """MoVQ: GroupNorm whose per-pixel scale and shift are 1x1 convs of the quantised code vectors zq, so every
    decoder layer is told which code sits where (zq is resized to the feature map by nearest neighbour)."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = GroupNorm(channels, groups)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def make_norm(channels: int, groups: int, zq_channels: int | None) -> nn.Module:
    # the encoder (zq_channels None) uses plain GroupNorm, Emu3's decoder SpatialNorm
    return GroupNorm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels, groups)


class ResnetBlock(nn.Module):
    """(norm -> swish -> conv3x3) twice, plus the input; a 1x1 `nin_shortcut` when the width changes.
    Emu3 has dropout 0.0 here, so there is no dropout layer."""

    def __init__(self, c_in: int, c_out: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.norm1 = make_norm(c_in, groups, zq_channels)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = make_norm(c_out, groups, zq_channels)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(F.silu(self.norm2(h, zq)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions of one frame, scale C^-0.5. q, k, v and proj_out are
    1x1 convs, as in the released checkpoint (transformers stores them as Linear layers; weights.py reshapes)."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.norm = make_norm(channels, groups, zq_channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x, zq)
        q, k, v = (conv(h).view(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C); one head, default scale C^-0.5
        h = h.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Resample(nn.Module):
    """2x in H and W: nearest upsampling + conv3x3 in the decoder; in the encoder a stride-2 conv3x3 after taming's
    asymmetric zero pad (right and bottom only), which takes H to exactly H/2."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by attention at attention levels, then an optional resample.
    A plain container, so parameters read `down.{level}.block.{j}`, `up.{level}.attn.{j}`, `down.{level}.downsample`."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, groups: int,
                 zq_channels: int | None = None, resample: str | None = None):  # resample: "down", "up" or None
        super().__init__()
        widths_in = [c_in] + [c_out] * (n_blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(c, c_out, groups, zq_channels) for c in widths_in)
        self.attn = nn.ModuleList(AttnBlock(c_out, groups, zq_channels) for _ in range(n_blocks if attn else 0))
        self.resample = resample
        if resample == "down":
            self.downsample = Resample(c_out, up=False)
        elif resample == "up":
            self.upsample = Resample(c_out, up=True)

    def forward(self, h: Tensor, zq: Tensor | None = None) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h, zq)
            if len(self.attn) > 0:
                h = self.attn[j](h, zq)
        if self.resample == "down":
            h = self.downsample(h)
        elif self.resample == "up":
            h = self.upsample(h)
        return h


class Mid(nn.Module):
    """res -> attention -> res at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, zq_channels)
        self.attn_1 = AttnBlock(channels, groups, zq_channels)
        self.block_2 = ResnetBlock(channels, channels, groups, zq_channels)

    def forward(self, h: Tensor, zq: Tensor | None = None) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


# ---------------------------------------------------------------------------------------------------------------
# temporal building blocks, on the embed_dim-wide latent laid out as (B, C, T, h, w)


class CausalConv3d(nn.Module):
    """Conv3d padded with 2 zero frames in front and none behind, so output frame t never sees input frames after t.
    Emu3 pads 2 front frames whatever the kernel (also for the 4-frame strided kernel); H and W get 'same' padding."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        ph, pw = kernel[1] - stride[1], kernel[2] - stride[2]
        self.padding = (pw - pw // 2, pw // 2, ph - ph // 2, ph // 2, 2, 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class TimeConv(nn.Module):
    """2x in time: a stride-2 causal conv in the encoder (T -> T/2); in the decoder each frame is repeated
    (nearest upsampling along T, T -> 2T) and then smoothed by a causal conv."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        kernel, stride = ((3, 3, 3), (1, 1, 1)) if up else ((4, 3, 3), (2, 1, 1))
        self.conv = CausalConv3d(channels, channels, kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = x.repeat_interleave(2, dim=2)  # (B, C, 2T, h, w)
        return self.conv(x)


class TemporalResnetBlock(nn.Module):
    """A residual block along time: BatchNorm3d (running statistics at inference) and causal 3x3x3 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv1 = CausalConv3d(channels, channels, (3, 3, 3))
        self.norm2 = nn.BatchNorm3d(channels)
        self.conv2 = CausalConv3d(channels, channels, (3, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h
