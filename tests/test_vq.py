"""Tests for nano_emu.vq (the Emu3 vision tokenizer), nano_emu.weights (VQ name map, strict loader) and
nano_emu.image (the released pre/post-processing). Parity is against transformers' Emu3VQVAE with random weights."""

import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nano_emu.image import image_to_tensor, load_clip, load_image, smart_resize, tensor_to_image
from nano_emu.train import codebook_usage, init_vq_for_training, restart_dead_codes
from nano_emu.vq import VQConfig, VQModel, VectorQuantizer
from nano_emu.emu3 import VQ_HF_TO_ORIGINAL, load_emu3_vq, vq_from_hf
from nano_emu.weights import load_state_dict_strict, rename

transformers = pytest.importorskip("transformers")
from transformers import Emu3VQVAE, Emu3VQVAEConfig  # noqa: E402

# a small reference config that still differs from emu3() in every knob: 3 levels, 1 res block, width-8 codes
SMALL_REF = dict(base_channels=32, channel_multiplier=[1, 2, 4], num_res_blocks=1, attn_resolutions=[2],
                 hidden_size=128, codebook_size=256, embed_dim=8, latent_channels=8)
SMALL = VQConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,), embed_dim=8, codebook_size=256,
                 norm_groups=32)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Random affine params and BatchNorm running stats, so parity proves they are loaded and used."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.BatchNorm3d)):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(123)


def make_reference(**config) -> nn.Module:
    torch.manual_seed(0)
    ref = Emu3VQVAE(Emu3VQVAEConfig(**config)).eval()
    randomize_norms(ref)
    return ref


def load_from_reference(ref: nn.Module, cfg: VQConfig) -> VQModel:
    with torch.device("meta"):
        ours = VQModel(cfg)
    load_state_dict_strict(ours, vq_from_hf(ref.state_dict(), prefix=""), source="reference", assign=True)
    return ours.eval()


@pytest.fixture(scope="module")
def small_pair():
    ref = make_reference(**SMALL_REF)
    return ref, load_from_reference(ref, SMALL)


@pytest.fixture(scope="module")
def emu3_pair():
    ref = make_reference()  # the released defaults: 270.7M parameters
    return ref, load_from_reference(ref, VQConfig.emu3())


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def check_parity(ref, ours, x):
    B, size = x.shape[0], torch.tensor([x.shape[-2:]] * x.shape[0])
    out = ref.encode(x, image_sizes=size)
    ref_codes = torch.stack(out.image_tokens)
    ref_latent = ref.quant_conv(out.last_hidden_state.transpose(1, 2))  # (B, C, t, h, w)
    torch.testing.assert_close(ours.latent(x), ref_latent, rtol=1e-4, atol=1e-4)
    codes = ours.encode(x)
    assert torch.equal(codes, ref_codes)
    ref_pixels, our_pixels = ref.decode(codes), ours.decode(codes)
    assert our_pixels.shape == ref_pixels.shape
    torch.testing.assert_close(our_pixels, ref_pixels, rtol=1e-4, atol=1e-4 * ref_pixels.abs().max().item())


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("frames", [0, 4, 8])  # 0 = image
def test_parity_small(small_pair, frames):
    ref, ours = small_pair
    x = pixels(2, 3, 16, 16) if frames == 0 else pixels(1, frames, 3, 16, 16)
    check_parity(ref, ours, x)


@pytest.mark.parametrize("frames", [0, 4])
def test_parity_emu3_full_size(emu3_pair, frames):
    ref, ours = emu3_pair
    x = pixels(1, 3, 16, 16) if frames == 0 else pixels(1, frames, 3, 16, 16)
    check_parity(ref, ours, x)


def test_batchnorm_stats_loaded(small_pair):
    ref, ours = small_pair
    bn_ref, bn_ours = ref.encoder.time_res_stack[0].norm1, ours.encoder.time_res_stack[0].norm1
    assert torch.equal(bn_ours.running_var, bn_ref.running_var) and bn_ours.num_batches_tracked.item() == 123


def test_emu3_parameter_count():
    with torch.device("meta"):
        ref, ours = Emu3VQVAE(Emu3VQVAEConfig()), VQModel(VQConfig.emu3())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref == 270_740_287
    assert sum(b.numel() for b in ours.buffers()) == sum(b.numel() for b in ref.buffers())


# ------------------------------------------------------------------------------------------------ weight names


def hf_to_original_independently(state_dict):
    """The -hf -> original renaming written a second way (regexes, not weights.VQ_HF_TO_ORIGINAL)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("down_block.down.", "down.").replace("up_block.up.", "up.").replace("middle_block.", "mid.")
        k = re.sub(r"attn_norms\.(\d+)\.", r"attn.\1.norm.", k).replace("mid.attn_norm.", "mid.attn_1.norm.")
        k = re.sub(r"\.(q|k|v)_proj\.", r".\1.", k).replace(".out_proj.", ".proj_out.")
        out[k] = v[:, :, None, None] if re.search(r"\.(q|k|v|proj_out)\.weight$", k) else v
    return out


def test_original_layout_loads_strictly(small_pair):
    ref, ours = small_pair
    original = hf_to_original_independently(ref.state_dict())
    mapped = vq_from_hf(ref.state_dict(), prefix="")
    assert original.keys() == mapped.keys() == ours.state_dict().keys()
    assert all(torch.equal(original[k], mapped[k]) for k in original)
    fresh = VQModel(SMALL)
    load_state_dict_strict(fresh, original, source="original-layout")
    x = pixels(1, 3, 16, 16)
    assert torch.equal(fresh.eval().encode(x), ours.encode(x))


def test_emu3_has_released_names():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VQModel(VQConfig.emu3()).state_dict().items()}
    assert shapes["encoder.down.3.attn.1.q.weight"] == (1024, 1024, 1, 1)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.bias"] == (1024,)
    assert shapes["encoder.time_conv.1.conv.conv.weight"] == (4, 4, 4, 3, 3)
    assert shapes["encoder.time_res_stack.1.norm2.running_mean"] == (4,)
    assert shapes["decoder.time_conv.0.conv.conv.weight"] == (4, 4, 3, 3, 3)
    assert shapes["decoder.up.3.attn.2.norm.conv_y.weight"] == (1024, 4, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.norm_out.norm_layer.weight"] == (256,)
    assert shapes["quantize.embedding.weight"] == (32768, 4)
    assert shapes["quant_conv.conv.weight"] == shapes["post_quant_conv.conv.weight"] == (4, 4, 3, 1, 1)
    assert not any(k.startswith(("decoder.up.0.upsample", "encoder.down.3.downsample")) for k in shapes)


def test_rename_rejects_unknown_keys():
    hf_key = "decoder.up_block.up.2.block.1.norm1.conv_b.bias"
    assert rename(hf_key, VQ_HF_TO_ORIGINAL) == "decoder.up.2.block.1.norm1.conv_b.bias"
    with pytest.raises(ValueError, match=r"my.ckpt: no entry in the name map for key 'encoder.bogus.weight'"):
        vq_from_hf({"vqmodel.encoder.bogus.weight": torch.zeros(1)}, source="my.ckpt")


def test_strict_loader_lists_every_problem_before_loading():
    model = VQModel(VQConfig.tiny())
    sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    del sd["encoder.conv_in.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quantize.embedding.weight"] = torch.zeros(7, 8)
    before = model.decoder.conv_out.weight.clone()
    with pytest.raises(ValueError) as err:
        load_state_dict_strict(model, sd, source="bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "1 missing keys: encoder.conv_in.weight" in msg
    assert "1 unexpected keys: encoder.extra.weight" in msg
    assert "quantize.embedding.weight: checkpoint (7, 8) vs model (256, 4)" in msg
    assert torch.equal(model.decoder.conv_out.weight, before)  # nothing was loaded


def test_load_vq_from_safetensors(small_pair, tmp_path):
    from safetensors.torch import save_file

    ref, ours = small_pair
    hf = {"vqmodel." + k: v.contiguous() for k, v in ref.state_dict().items()}
    keys = sorted(hf)  # a sharded -hf checkpoint that also holds (a stand-in for) the language model
    (tmp_path / "hf").mkdir()
    text_model = {"text_model.lm_head.weight": torch.ones(4)}
    save_file({k: hf[k] for k in keys[::2]} | text_model, tmp_path / "hf/a.safetensors")
    save_file({k: hf[k] for k in keys[1::2]}, tmp_path / "hf/b.safetensors")
    save_file(vq_from_hf(ref.state_dict(), prefix=""), tmp_path / "original.safetensors")
    codes = torch.randint(0, SMALL.codebook_size, (1, 4, 4))
    for path in (tmp_path / "hf", tmp_path / "original.safetensors"):
        loaded = load_emu3_vq(path, cfg=SMALL)
        assert not loaded.training
        assert torch.equal(loaded.decode(codes), ours.decode(codes))
    with pytest.raises(ValueError, match="original.safetensors"):
        load_emu3_vq(tmp_path / "original.safetensors", cfg=VQConfig.tiny())


# ------------------------------------------------------------------------------------------------ shortcut, training


def test_image_shortcut_equals_full_path():
    """The released path runs an image as a clip of 4 identical frames, i.e. the video path; the shortcut agrees."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny())
    randomize_norms(vq)
    x = pixels(2, 3, 64, 64)
    clip = x.unsqueeze(1).expand(-1, 4, -1, -1, -1)  # (B, 4, 3, H, W)
    vq.eval()
    codes = vq.encode(x)
    assert codes.shape == (2, 8, 8)
    assert torch.equal(codes, vq.encode(clip)[:, 0])
    torch.testing.assert_close(vq.latent(x), vq.latent(clip), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.decode(codes), vq.decode(codes[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    vq.train()  # batch statistics too: the temporal stack always runs on all frames
    torch.testing.assert_close(vq.latent(x), vq.latent(clip), rtol=1e-5, atol=1e-6)


def toy_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Coloured rectangles on black, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), -1.0)
    for i in range(n):
        top = size // 8 * (i % 3 + 1)
        x[i, :, top:top + size // 2, size // 8:size // 8 + size // 2 + 4 * i] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


def test_toy_training_reconstructs():
    torch.manual_seed(0)
    cfg = VQConfig.tiny()
    vq = VQModel(cfg)
    init_vq_for_training(vq)
    x = toy_images(2, 32)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = vq(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.recon.shape == x.shape and out.codes.shape == (2, 4, 4)
    assert losses[-1] < losses[0] / 4, losses
    vq.eval()
    recon = vq.decode(vq.encode(x))
    assert F.mse_loss(recon, x) < 0.5 * x.var()  # far better than predicting the mean colour


def test_straight_through_gradients_reach_encoder():
    vq = VQModel(VQConfig.tiny())
    init_vq_for_training(vq)
    x = toy_images(2, 32)
    out = vq(x)
    F.mse_loss(out.recon, x).backward()  # reconstruction only: no commitment-loss path to the encoder
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    # the temporal path too (its residual branches start at zero, so check the strided time conv on the main path)
    assert vq.encoder.time_conv[0].conv.conv.weight.grad.abs().sum() > 0
    assert vq.quantize.embedding.weight.grad is None  # codes are chosen, not differentiated through


def test_video_training_forward():
    vq = VQModel(VQConfig.tiny())
    out = vq(pixels(1, 8, 3, 32, 32))
    assert out.recon.shape == (1, 8, 3, 32, 32) and out.codes.shape == (1, 2, 4, 4)
    assert set(out.losses) == {"recon", "codebook", "commit"}


def test_codebook_usage():
    assert codebook_usage(torch.tensor([[0, 1], [1, 3]]), 8) == 3 / 8


@pytest.mark.parametrize("l2_norm", [True, False])
def test_restart_moves_only_dead_codes_onto_encoder_outputs(l2_norm):
    """Codebook collapse is what the restart is against: encoder outputs far from a random codebook all pick the
    same few codes. After a restart every unused code sits on an encoder output of the batch, the used codes are
    untouched, and the same batch now spreads over many codes."""
    torch.manual_seed(0)
    K, C = 64, 4
    quantizer = VectorQuantizer(VQConfig.tiny(codebook_size=K, embed_dim=C, l2_norm=l2_norm))
    latents = torch.randn(2, C, 1, 3, 3) + 4   # (B, C, t, h, w): 18 vectors off to one side of the N(0, 1) codebook
    codes = quantizer(latents)[1]
    counts = torch.bincount(codes.flatten(), minlength=K)
    dead = counts == 0
    assert codebook_usage(codes, K) <= 8 / K   # 18 outputs on a handful of codes: the setting of a restart
    before = quantizer.embedding.weight.clone()

    assert restart_dead_codes(quantizer, latents, counts) == dead.sum() > 0
    after = quantizer.embedding.weight
    assert torch.equal(after[~dead], before[~dead])
    outputs = latents.permute(0, 2, 3, 4, 1).reshape(-1, C)   # (18, C)
    outputs = F.normalize(outputs, dim=-1) if l2_norm else outputs
    assert (after[dead, None] - outputs[None]).abs().amax(-1).min(dim=1).values.max() < 1e-6   # (dead, 18) -> (dead,)
    assert codebook_usage(quantizer(latents)[1], K) >= 12 / K   # most of the 18 outputs now have a code of their own


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("x, match", [
    (torch.zeros(3, 32, 32), r"expected images \(B, 3, H, W\) or video \(B, T, 3, H, W\), got shape \(3, 32, 32\)"),
    (torch.zeros(1, 4, 32, 32), r"expected 3 channels in dim 1, got shape \(1, 4, 32, 32\)"),
    (torch.zeros(1, 6, 3, 32, 32), r"video frames must be a multiple of temporal_factor=4, got T=6"),
    (torch.zeros(1, 3, 32, 36), r"H and W must be positive multiples of spatial_factor=8, got 32x36"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"expected float pixels in \[-1, 1\], got dtype torch.uint8"),
])
def test_encode_rejects_bad_pixels(x, match):
    vq = VQModel(VQConfig.tiny())
    with pytest.raises(ValueError, match=match):
        vq.encode(x)
    with pytest.raises(ValueError, match=match):
        vq(x)


@pytest.mark.parametrize("codes, match", [
    (torch.zeros(4, 4, dtype=torch.long), r"expected codes \(B, h, w\) for images or \(B, t, h, w\) for video, "
                                          r"got shape \(4, 4\)"),
    (torch.zeros(1, 4, 4), r"expected integer codes, got dtype torch.float32"),
    (torch.full((1, 4, 4), 256), r"codes must lie in \[0, 256\), got min 256 and max 256"),
    (torch.full((1, 1, 4, 4), -1), r"codes must lie in \[0, 256\), got min -1 and max -1"),
])
def test_decode_rejects_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        VQModel(VQConfig.tiny()).decode(codes)


def test_config_checks():
    with pytest.raises(ValueError, match=r"not divisible by norm_groups=32"):
        VQConfig.tiny(norm_groups=32, ch=16)
    with pytest.raises(ValueError, match=r"temporal_factor must be a power of 2, got 3"):
        VQConfig.tiny(temporal_factor=3)
    assert VQConfig.emu3().spatial_factor == 8 and VQConfig.tiny().spatial_factor == 8
    cfg = VQConfig.tiny(ch_mult=[1, 2, 4])  # e.g. read back from a JSON checkpoint header
    assert VQConfig(**asdict(cfg)) == cfg and cfg.spatial_factor == 4
    with pytest.raises(ValueError, match=r"attn_levels \(3,\) name levels that ch_mult \(1, 2, 4\) does not have"):
        VQConfig.tiny(ch_mult=(1, 2, 4), attn_levels=(3,))


# ------------------------------------------------------------------------------------------------ image processing


def test_smart_resize_cases():
    assert smart_resize(720, 720) == (720, 720)  # Emu3-Gen's default size is already valid
    assert smart_resize(1024, 1024) == (1024, 1024)
    h, w = smart_resize(300, 400)  # too small: grown to >= 512^2, rounded up
    assert h % 8 == w % 8 == 0 and h * w >= 512 * 512 and (h, w) == (448, 592)
    h, w = smart_resize(3000, 2000)  # too large: shrunk to <= 1024^2, rounded down
    assert h % 8 == w % 8 == 0 and h * w <= 1024 * 1024 and (h, w) == (1248, 832)
    assert smart_resize(64, 64, min_pixels=0) == (64, 64)
    with pytest.raises(ValueError, match=r"image of 4x100 is too small: both sides must be at least 8 pixels"):
        smart_resize(4, 100)
    with pytest.raises(ValueError, match=r"image of 100x600 has aspect ratio 6.0, more than the allowed 5.0"):
        smart_resize(100, 600)


def test_smart_resize_matches_transformers():
    from transformers.models.emu3.image_processing_emu3 import smart_resize as hf_smart_resize

    for h in range(8, 2400, 97):
        for w in range(max(8, h // 5 + 1), min(2400, 5 * h), 89):
            assert smart_resize(h, w) == hf_smart_resize(h, w, 8, 512 * 512, 1024 * 1024), (h, w)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_to_tensor_modes(mode):
    rgb = Image.new("RGB", (64, 48), (255, 0, 128))
    image = rgb.convert(mode)
    x = image_to_tensor(image, min_pixels=0)
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    if mode in ("RGB", "RGBA"):
        torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    assert image_to_tensor(image).shape[1:] == (448, 592)  # the released default grows it past 512^2


def test_tensor_to_image_roundtrip():
    data = torch.randint(0, 256, (16, 24, 3), dtype=torch.uint8)
    image = Image.fromarray(data.numpy())
    back = torch.from_numpy(np.array(tensor_to_image(image_to_tensor(image, min_pixels=0))))
    assert (back.int() - data.int()).abs().max() <= 1  # truncation to uint8, as released
    with pytest.raises(ValueError, match=r"expected pixels of shape \(3, H, W\)"):
        tensor_to_image(torch.zeros(1, 3, 8, 8))


def test_unreadable_image_file(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="cannot read image file .*not_an_image.png"):
        load_image(bad)
    with pytest.raises(ValueError, match="cannot read image file .*missing.jpg"):
        image_to_tensor(tmp_path / "missing.jpg")


def test_load_clip_keeps_a_gifs_held_frames_and_reads_folders_in_name_order(tmp_path):
    """PIL writes a run of identical frames once with the run's duration; read back, the clip keeps its 8 frames,
    which is what the VQ's 4-frame packing needs."""
    values = [0, 0, 90, 180, 180, 180, 60, 60]
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in values]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "clip.gif").n_frames == 4   # folded on write
    assert [np.asarray(f)[0, 0, 0] for f in load_clip(tmp_path / "clip.gif")] == values
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in reversed(list(enumerate(frames))):   # written out of order on purpose
        frame.save(folder / f"frame_{k:02d}.png")
    assert [np.asarray(f)[0, 0, 0] for f in load_clip(folder)] == values
    assert len(load_clip(tmp_path / "frames" / "frame_00.png")) == 1   # a still image is a one-frame clip
