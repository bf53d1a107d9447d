"""LlamaGen: parity with the reference code (golden outputs in tests/fixtures/llamagen, written by
make_llamagen_fixture.py from a tiny random GPT and VQ in the released file formats), the released sizes on the meta
device, and the loader's errors. No download and no reference code are needed to run these."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import nano_emu
import sample
from nano_emu import gpt as gpt_module
from hub_cache import COMMIT, offline_cache, write_repo  # noqa: F401 (offline_cache is a fixture)
from nano_emu.gpt import GPT, LLAMAGEN_SIZES, GPTConfig
from nano_emu.hub import HubError
from nano_emu.llamagen import ClassLabels, gpt_config, gpt_from_llamagen, rename_or_keep, vq_config, vq_names
from nano_emu.sampler import GREEDY, Guidance, generate_image
from nano_emu.vq import VQConfig, VQModel
from nano_emu.weights import check_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen"
GOLDEN = torch.load(FIXTURE / "golden.pt", weights_only=True)
RELEASED = json.loads((FIXTURE / "released_shapes.json").read_text())
TINY = dict(image_size=16, n_head=4)   # the fixture's GPT: 2 layers, width 80, 4 heads (head_dim 20), a 4x4 grid


@pytest.fixture(scope="module")
def pipe():
    return nano_emu.load_llamagen(FIXTURE / "gpt.pt", FIXTURE / "vq.pt", **TINY)


def class_tokens(pipe, classes):
    return pipe.gpt.config.vocab_size + classes   # input ids of the class tokens


# ------------------------------------------------------------------------------------------------ parity


def test_gpt_logits_match_reference(pipe):
    idx = torch.cat([class_tokens(pipe, GOLDEN["gpt_classes"])[:, None], GOLDEN["gpt_tokens"]], dim=1)
    logits = pipe.gpt(idx)   # (3, 16, 256); the third row is the null class
    torch.testing.assert_close(logits, GOLDEN["gpt_logits"], rtol=1e-5, atol=1e-5)


def test_vq_matches_reference(pipe):
    vq = pipe.vq
    torch.testing.assert_close(vq.latent(GOLDEN["vq_images"])[:, :, 0], GOLDEN["vq_latent"], rtol=1e-5, atol=1e-5)
    assert torch.equal(vq.encode(GOLDEN["vq_images"]), GOLDEN["vq_codes"])
    torch.testing.assert_close(vq.decode(GOLDEN["vq_decode_codes"]), GOLDEN["vq_pixels"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, interval", [("cfg", -1), ("cfg_interval3", 3)])
def test_greedy_cfg_sampling_matches_reference(pipe, name, interval):
    """The reference's generate(cfg_scale=4, cfg_interval, sample_logits=False) for classes 3 and 7: the same
    tokens through the shared sampler (doubled batch, static cache) with the null class as the negative prompt."""
    for rows in pipe.draw_stream(["3", "7"], cfg_scale=4.0, temperature=0, cfg_interval=interval):
        pass
    assert torch.equal(rows.tokens, GOLDEN[f"greedy_{name}"])
    assert torch.equal(rows.codes.flatten(1), GOLDEN[f"greedy_{name}"])


def test_same_tokens_from_every_file_format(pipe, tmp_path):
    """The DDP {"model": ...} file (with a stray freqs_cis), an FSDP raw state dict and safetensors forms."""
    ddp = torch.load(FIXTURE / "gpt.pt", weights_only=True)
    torch.save(ddp["model"], tmp_path / "c2i_fsdp_16.pt")
    vq_state = torch.load(FIXTURE / "vq.pt", weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in vq_state.items()}, tmp_path / "vq.safetensors")
    codes = GOLDEN["vq_decode_codes"]
    for gpt_file, vq_file in [(tmp_path / "c2i_fsdp_16.pt", FIXTURE / "vq.pt"),
                              (FIXTURE / "gpt.safetensors", tmp_path / "vq.safetensors")]:
        other = nano_emu.load_llamagen(gpt_file, vq_file, **TINY)
        for ours, theirs in zip(other.gpt.state_dict().values(), pipe.gpt.state_dict().values()):
            assert torch.equal(ours, theirs)
        assert torch.equal(other.vq.decode(codes), pipe.vq.decode(codes))


def test_raw_logit_and_logprob_cfg_agree(pipe):
    """Emu3 mixes log-probs, LlamaGen raw logits: they differ by a per-row constant, so greedy tokens agree."""
    V = pipe.gpt.config.vocab_size
    kwargs = dict(negative_prompts=[[V + 10]] * 2, sampling=GREEDY)
    a = generate_image(pipe.gpt, pipe.layout, [[V + 3], [V + 7]], 4, 4, guidance=Guidance(4.0, cfg_on="logits"),
                       **kwargs)[0]
    b = generate_image(pipe.gpt, pipe.layout, [[V + 3], [V + 7]], 4, 4, guidance=Guidance(4.0), **kwargs)[0]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ released sizes


@pytest.mark.parametrize("size, millions", [("GPT-B", 111), ("GPT-L", 343), ("GPT-XL", 775), ("GPT-XXL", 1411),
                                            ("GPT-3B", 3097)])
def test_released_gpt_sizes(size, millions):
    """The reference's full-size state dict (names and shapes, built on meta by the fixture script) maps onto
    GPTConfig.llamagen(size) exactly, the size is read off its shapes, and the parameter counts are equal."""
    shapes = {k: tuple(v) for k, v in RELEASED[size]["shapes"].items()}
    cfg = gpt_config(shapes, size, grid=16)
    assert cfg == GPTConfig.llamagen(size, 16)
    with torch.device("meta"):
        model = GPT(cfg)
        converted = gpt_from_llamagen({k: torch.empty(s) for k, s in shapes.items()}, cfg)
    check_state_dict(model, {k: tuple(v.shape) for k, v in converted.items()}, size)
    assert model.num_params() == RELEASED[size]["params"]
    assert round(model.num_params() / 1e6) == millions   # README: B 111M, L 343M, XL 775M, XXL 1.4B, 3B 3.1B


@pytest.mark.parametrize("size, downsample", [("VQ-16", 16), ("VQ-8", 8)])
def test_released_vq_sizes(size, downsample):
    shapes = {k: tuple(v) for k, v in RELEASED[size]["shapes"].items()}
    cfg = vq_config(shapes, size)
    assert cfg == VQConfig.llamagen(downsample) and cfg.spatial_factor == downsample
    names = vq_names(cfg)
    with torch.device("meta"):
        model = VQModel(cfg)
    converted = {rename_or_keep(k, names): s for k, s in shapes.items() if k != "quantize.codebook_used"}
    check_state_dict(model, converted, size)
    assert sum(p.numel() for p in model.parameters()) == RELEASED[size]["params"]   # 71.9M / 70.1M


def test_two_d_rope_zeroes_the_condition_token():
    """The released quirk: cos = sin = 0 at the class position, so its query and key are zero."""
    cfg = GPTConfig.llamagen("GPT-B", 16, n_layer=1, dim=64, n_head=2, n_kv_head=2, intermediate_size=64)
    cos, sin = gpt_module.rope_cos_sin(torch.tensor([[0, 1, 17, 18]]), cfg, torch.float32)   # (1, 4, 32)
    assert cos[0, 0].abs().sum() == 0 and sin[0, 0].abs().sum() == 0
    # token 0 sits at (0, 0), token 16 at (1, 0), token 17 at (1, 1): rows turn the first half, columns the second
    assert torch.all(cos[0, 1] == 1)
    assert torch.equal(cos[0, 2, 8:16], torch.ones(8)) and not torch.equal(cos[0, 2, :8], torch.ones(8))
    assert torch.equal(cos[0, 3, :8], cos[0, 3, 8:16])


# ------------------------------------------------------------------------------------------------ errors


def test_wrong_truncated_and_swapped_files(tmp_path):
    gpt, vq = FIXTURE / "gpt.pt", FIXTURE / "vq.pt"
    with pytest.raises(ValueError, match=r"the two checkpoints are swapped: .*vq.pt is the VQ tokenizer and "
                                         r".*gpt.pt the GPT"):
        nano_emu.load_llamagen(vq, gpt, **TINY)
    with pytest.raises(ValueError, match=r"vq.pt is a LlamaGen VQ tokenizer checkpoint, not the GPT: pass it as "
                                         r"vq_ckpt"):
        nano_emu.load_llamagen(vq, vq, **TINY)
    with pytest.raises(ValueError, match=r"gpt.pt is a LlamaGen GPT checkpoint, not the VQ tokenizer: pass it as "
                                         r"gpt_ckpt"):
        nano_emu.load_llamagen(gpt, gpt, **TINY)
    truncated = tmp_path / "c2i_B_256.pt"
    truncated.write_bytes(gpt.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"cannot read .*c2i_B_256.pt: not a torch.save zip archive .*truncated"):
        nano_emu.load_llamagen(truncated, vq)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.pt: not a torch.save zip archive"):
        nano_emu.load_llamagen(gpt, text, **TINY)
    broken = tmp_path / "vq.safetensors"
    save_file({"quantize.embedding.weight": torch.zeros(4, 2)}, broken)
    broken.write_bytes(broken.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"cannot read .*vq.safetensors: .*truncated or corrupt"):
        nano_emu.load_llamagen(gpt, broken, **TINY)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing.pt does not exist"):
        nano_emu.load_llamagen(tmp_path / "missing.pt", vq, **TINY)


class NotATensor:
    pass


RAN = []


def run_code(what):
    RAN.append(what)


class RunsCode:
    def __reduce__(self):   # unpickling this calls run_code("ran"): what weights-only loading must never do
        return run_code, ("ran",)


def test_pickled_code_is_never_run(tmp_path):
    """A training checkpoint with Python objects besides tensors is refused by weights_only loading, with
    PyTorch's own line naming the class; an object whose unpickling would call a function is refused unrun, even
    tucked inside an argparse.Namespace (the one class allowed)."""
    state = torch.load(FIXTURE / "vq.pt", weights_only=True)
    torch.save({**state, "args": NotATensor()}, tmp_path / "vq_training.pt")
    with pytest.raises(ValueError, match=r"cannot read .*vq_training.pt as a weights-only PyTorch checkpoint: it "
                                         r"holds Python objects .*\(WeightsUnpickler error: Unsupported global: "
                                         r"GLOBAL [\w.]*NotATensor was not an allowed global by default\)"):
        nano_emu.load_llamagen(FIXTURE / "gpt.pt", tmp_path / "vq_training.pt", **TINY)
    torch.save({**state, "args": argparse.Namespace(hook=RunsCode())}, tmp_path / "vq_hooked.pt")
    with pytest.raises(ValueError, match=r"Unsupported global: GLOBAL [\w.]*run_code "):
        nano_emu.load_llamagen(FIXTURE / "gpt.pt", tmp_path / "vq_hooked.pt", **TINY)
    assert RAN == []


def test_training_checkpoints_as_the_scripts_save_them(pipe, tmp_path):
    """LlamaGen's train_c2i.py / vq_train.py save {"model", "optimizer", "steps", "args"} with `args` an
    argparse.Namespace: loaded weights-only (the Namespace allowed, the optimizer state never read)."""
    def training_file(name, fixture):
        weights = torch.load(FIXTURE / fixture, weights_only=True)["model"]
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param], lr=1e-4)
        param.grad = torch.ones(3)
        optimizer.step()   # so the optimizer state holds tensors (exp_avg, ...), as a real one does
        args = argparse.Namespace(gpt_model="GPT-B", image_size=256, lr=1e-4, results_dir="results", no_compile=False,
                                  ckpt_every=5000, mixed_precision="bf16", betas=(0.9, 0.95), global_seed=0)
        torch.save({"model": weights, "optimizer": optimizer.state_dict(), "steps": 5000, "args": args},
                   tmp_path / name)
        return tmp_path / name
    gpt, vq = training_file("0005000.pt", "gpt.pt"), training_file("vq_0005000.pt", "vq.pt")
    loaded = nano_emu.load_llamagen(gpt, vq, **TINY)
    for ours, theirs in zip(loaded.gpt.state_dict().values(), pipe.gpt.state_dict().values()):
        assert torch.equal(ours, theirs)
    codes = GOLDEN["vq_decode_codes"]
    assert torch.equal(loaded.vq.decode(codes), pipe.vq.decode(codes))


def test_a_legacy_torch_save_file_is_named_as_such(pipe, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False), PyTorch < 1.6's format: read weights-only (whole, as
    it cannot be memory-mapped); cut short, the error says what kind of file it is."""
    legacy = tmp_path / "vq_legacy.pt"
    torch.save(torch.load(FIXTURE / "vq.pt", weights_only=True), legacy, _use_new_zipfile_serialization=False)
    loaded = nano_emu.load_llamagen(FIXTURE / "gpt.pt", legacy, **TINY)
    codes = GOLDEN["vq_decode_codes"]
    assert torch.equal(loaded.vq.decode(codes), pipe.vq.decode(codes))
    legacy.write_bytes(legacy.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cannot read .*vq_legacy.pt as a legacy \(non-zip\) torch.save file "
                                         r"\(it is truncated or corrupt"):
        nano_emu.load_llamagen(FIXTURE / "gpt.pt", legacy, **TINY)


def test_the_vq_passed_as_the_gpt_is_named_first(tmp_path):
    """Without --image-size the loader used to ask for the image size of what is not a GPT at all."""
    vq = tmp_path / "vq_ds16_c2i.pt"
    vq.write_bytes((FIXTURE / "vq.pt").read_bytes())
    with pytest.raises(ValueError, match=r"vq_ds16_c2i.pt is a LlamaGen VQ tokenizer checkpoint, not the GPT"):
        nano_emu.load_llamagen(vq, vq, n_head=4)


def test_load_by_hub_id_offline(pipe, offline_cache):
    """FoundationVision/LlamaGen holds its .pt files side by side: each is named by ORG/NAME[@REVISION]/FILE."""
    write_repo(offline_cache, "FoundationVision/LlamaGen", {"c2i_tiny_16.pt": FIXTURE / "gpt.pt",
                                                            "vq_ds16_c2i.pt": FIXTURE / "vq.pt"})
    loaded = nano_emu.load_llamagen("FoundationVision/LlamaGen/c2i_tiny_16.pt",
                                    f"FoundationVision/LlamaGen@{COMMIT}/vq_ds16_c2i.pt", **TINY)
    for ours, theirs in zip(loaded.gpt.state_dict().values(), pipe.gpt.state_dict().values()):
        assert torch.equal(ours, theirs)
    with pytest.raises(HubError, match=r"FoundationVision/LlamaGen/c2i_XL_384.pt is not in the Hugging Face cache"):
        nano_emu.load_llamagen("FoundationVision/LlamaGen/c2i_XL_384.pt", "FoundationVision/LlamaGen/vq_ds16_c2i.pt")


def test_sizes_names_and_image_size():
    gpt, vq = FIXTURE / "gpt.pt", FIXTURE / "vq.pt"
    with pytest.raises(ValueError, match=r"a GPT of 2 layers and width 80 is none of the released sizes .*GPT-B "
                                         r"\(12 layers, width 768\).*pass n_head"):
        nano_emu.load_llamagen(gpt, vq, image_size=16)
    with pytest.raises(ValueError, match=r"unknown LlamaGen size 'GPT-S'; the released ones are GPT-B, GPT-L"):
        nano_emu.load_llamagen(gpt, vq, gpt_model="GPT-S", **TINY)
    with pytest.raises(ValueError, match=r"gpt.pt holds a 2-layer, 80-wide GPT, not GPT-L"):
        nano_emu.load_llamagen(gpt, vq, gpt_model="GPT-L", **TINY)
    with pytest.raises(ValueError, match=r"cannot tell the image size from the file name gpt.pt .*pass image_size"):
        nano_emu.load_llamagen(gpt, vq, n_head=4)


def test_missing_and_unexpected_keys_are_listed_before_reading(tmp_path):
    state = torch.load(FIXTURE / "gpt.pt", weights_only=True)["model"]
    del state["layers.1.feed_forward.w2.weight"]
    state["layers.0.attention.bias"] = torch.zeros(3)
    state["layers.0.attention.wqkv.weight"] = torch.zeros(7, 80)
    torch.save({"model": state}, tmp_path / "gpt.pt")
    with pytest.raises(ValueError) as err:
        nano_emu.load_llamagen(tmp_path / "gpt.pt", FIXTURE / "vq.pt", **TINY)
    msg = str(err.value)
    assert "gpt.pt (GPT) into GPT" in msg
    assert ("4 missing keys: layers.0.self_attn.k_proj.weight, layers.0.self_attn.q_proj.weight, "
            "layers.0.self_attn.v_proj.weight, layers.1.mlp.down_proj.weight") in msg
    assert "2 unexpected keys: layers.0.attention.bias, layers.0.attention.wqkv.weight" in msg


def test_class_labels():
    labels = ClassLabels(16384, 1000)
    assert labels.encode("207") == labels.encode("golden retriever") == labels.encode("Golden Retriever") == [16591]
    assert labels.encode("") == [17384] and labels.decode([17384]) == "null class"
    assert labels.encode("red panda") == [16384 + 387] and labels.decode([16384 + 387]) == "lesser panda"
    with pytest.raises(ValueError, match=r"unknown class 'dragon'"):
        labels.encode("dragon")
    with pytest.raises(ValueError, match=r"unknown class '1000'"):
        labels.encode("1000")


def test_sample_py_draws_a_labelled_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(LLAMAGEN_SIZES, "GPT-tiny", (2, 4, 80))   # let the fixture's size count as released
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--llamagen", str(FIXTURE / "gpt.pt"), "--vq", str(FIXTURE / "vq.pt"),
                                   "--image-size", "16", "--class", "3", "--class", "7", "--n", "3", "--seed", "0",
                                   "--device", "cpu", "--out", str(out)]))
    assert Image.open(out).size == (3 * 16, 2 * (16 + 14))   # 3 columns, 2 labelled rows
    printed = capsys.readouterr().out
    assert "6 image(s) of 4x4 tokens" in printed and f"wrote {out} (2 classes x 3)" in printed


def test_sample_py_writes_one_image_bare(tmp_path, monkeypatch, capsys):
    """--class X --n 1: the picture alone (before: a 14-pixel label strip above it, 16x30 here, 256x270 released)."""
    monkeypatch.setitem(LLAMAGEN_SIZES, "GPT-tiny", (2, 4, 80))
    out = tmp_path / "one.png"
    sample.main(sample.parse_args(["--llamagen", str(FIXTURE / "gpt.pt"), "--vq", str(FIXTURE / "vq.pt"),
                                   "--image-size", "16", "--class", "7", "--device", "cpu", "--out", str(out)]))
    assert Image.open(out).size == (16, 16)
    assert f"wrote {out} (class 7: 7)" in capsys.readouterr().out   # the fixture's 10 classes have no names
