"""nano_emu.emu3.load_emu3 against transformers' Emu3ForConditionalGeneration, on a tiny random checkpoint saved the
way transformers saves it (-hf layout, sharded) and rewritten into the original two-folder layout.

Parity: the same logits on a prompt that mixes text and an image block (transformers encodes the image with its
own VQ), the same greedy tokens from CFG image generation with Emu3's grid constraint (transformers' generate with
guidance_scale, negative_prompt_ids and prefix_allowed_tokens_fn, as in Emu3's demo), the same decoded pixels, and
the same greedy answer about an image. Then the clear errors, and sample.py end to end.
"""

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import sample
from nano_emu import load_emu3
from nano_emu.emu3 import EMU3_NEGATIVE_PROMPT, EMU3_PROMPT_SUFFIX
from nano_emu.image import image_to_tensor, tensor_to_image
from nano_emu.layout import EMU3_CHAT_TEMPLATE
from nano_emu.tokenizer import QWEN_SPECIALS
from nano_emu.emu3 import vq_from_hf
from nano_emu.hub import HubError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tiktoken")

# A tiny vocabulary in the released order: 256 single-byte BPE ranks, QWen's 208 specials (<|extra_0|> renamed
# <image> as the -hf converter does), the 3 image specials, then one visual token per VQ code.
N_CODES = 32
IMAGE_SPECIALS = ["<|image token|>", "<|image start|>", "<|image end|>"]
VISUAL = [f"<|visual token {c:06d}|>" for c in range(N_CODES)]
SPECIALS = ["<image>" if s == "<|extra_0|>" else s for s in QWEN_SPECIALS] + IMAGE_SPECIALS + VISUAL
ID = {s: 256 + i for i, s in enumerate(SPECIALS)}
PAD, BOS, EOS, EOL, EOF = (ID[s] for s in ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|extra_200|>",
                                            "<|extra_201|>"))
IMG, BOI, EOI, FIRST_VISUAL = ID["<|image token|>"], ID["<|image start|>"], ID["<|image end|>"], ID[VISUAL[0]]
VOCAB = 256 + len(SPECIALS)

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
# 2 levels: 2x2 pixels per code, so a 16x16 image is an 8x8 grid
VQ = dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
          codebook_size=N_CODES, embed_dim=4, latent_channels=4)
SIDE = 16
H = W = SIDE // 2


def byte_level(b: int) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode   # GPT-2's table, not the module under test
    return bytes_to_unicode()[b]


def write_hf_tokenizer(folder: Path) -> None:
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in ID.items()]
    byte_cfg = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_cfg, "post_processor": None, "decoder": byte_cfg,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": {byte_level(b): b for b in range(256)} | ID, "merges": []}}, ensure_ascii=False))


def write_original_tokenizer(folder: Path) -> None:
    (folder / "emu3.tiktoken").write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(IMAGE_SPECIALS + VISUAL) + "\n")


def write_sharded(folder: Path, tensors: dict, n_shards: int) -> None:
    if n_shards == 1:                                  # a single model.safetensors, no index
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
        return
    keys, weight_map = sorted(tensors), {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys[i::n_shards]}, folder / name)
        weight_map |= {k: name for k in keys[i::n_shards]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Random norms, BatchNorm statistics and larger weights, so parity proves every tensor is loaded and used."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def tiny_emu3(tmp_path_factory, hf_shard_size="5GB", llm_shards=1):
    """(-hf folder, original LLM folder, original VQ folder, the transformers reference model) of one tiny Emu3."""
    torch.manual_seed(0)
    config = transformers.Emu3Config(text_config=TEXT, vq_config=VQ,
                                     vocabulary_map={byte_level(b): b for b in range(256)} | ID)
    ref = transformers.Emu3ForConditionalGeneration(config).eval()
    perturb(ref)
    hf = tmp_path_factory.mktemp("emu3_hf")
    ref.save_pretrained(hf, max_shard_size=hf_shard_size)    # the Hub -hf names (and an index if sharded)
    write_hf_tokenizer(hf)
    saved = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**saved, "image_area": SIDE * SIDE}))   # else 720x720

    # the same weights in the original layout, renamed independently of nano_emu.emu3
    tensors = {}
    for shard in sorted(hf.glob("*.safetensors")):
        tensors |= load_file(shard)
    llm, vq = tmp_path_factory.mktemp("emu3_gen"), tmp_path_factory.mktemp("emu3_vision_tokenizer")
    write_sharded(llm, {k.replace("text_model.lm_head.", "lm_head.").replace("text_model.model.", "model."): v
                        for k, v in tensors.items() if k.startswith("text_model.")}, n_shards=llm_shards)
    (llm / "config.json").write_text(json.dumps({
        "architectures": ["Emu3ForCausalLM"], "model_type": "Emu3", "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
        "rope_scaling": None, "attention_dropout": 0.1, "tie_word_embeddings": False, "pretraining_tp": 1,
        "initializer_range": 0.02, "image_area": SIDE * SIDE, "pad_token_id": PAD, "bos_token_id": BOS,
        "eos_token_id": EOS, "img_token_id": IMG, "boi_token_id": BOI, "eoi_token_id": EOI, "eol_token_id": EOL,
        "eof_token_id": EOF, "torch_dtype": "float32", "transformers_version": "4.44.0"}))
    write_original_tokenizer(llm)
    save_file({k: v.contiguous() for k, v in vq_from_hf(tensors, prefix="vqmodel.").items()}, vq / "model.safetensors")
    (vq / "config.json").write_text(json.dumps({
        "architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ", "ch": 32, "ch_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": [1], "codebook_size": N_CODES, "embed_dim": 4, "z_channels": 4,
        "double_z": False, "in_channels": 3, "out_channels": 3, "temporal_downsample_factor": 4, "dropout": 0.0}))
    return hf, llm, vq, ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Sharded both ways: the -hf folder in several shards, the original LLM folder in 3."""
    return tiny_emu3(tmp_path_factory, hf_shard_size="300KB", llm_shards=3)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return load_emu3(checkpoint[0], dtype=torch.float32)


def image_pixels(seed=0):
    return torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def mixed_prompt_logits(pipe, ref):
    """Logits of the Chat prompt 'BOS template(image block, question)': ours from our VQ codes and layout, the
    reference's from pixel_values, with the block's visual and EOL tokens as <image> placeholders (its processor's
    expansion) that it fills from its own VQ."""
    x = image_pixels()
    codes = pipe.vq.encode(x)[0]
    ids = torch.tensor([pipe.layout.understanding_prompt(codes, "What is it?", pipe.tokenizer, EMU3_CHAT_TEMPLATE)])
    in_grid = (ids >= FIRST_VISUAL) | (ids == EOL)
    assert in_grid.sum() == H * (W + 1)
    expected = ref(input_ids=ids.masked_fill(in_grid, ID["<image>"]), pixel_values=x,
                   image_sizes=torch.tensor([[SIDE, SIDE]])).logits
    return pipe.gpt(ids), expected


# ------------------------------------------------------------------------------------------------ parity


def test_hf_layout_logits_match_transformers(checkpoint, pipe):
    hf, _, _, ref = checkpoint
    assert len(list(hf.glob("model-*.safetensors"))) > 2                     # really sharded through an index
    assert pipe.gpt.config.rope_theta == 5e5 and pipe.gpt.config.max_seq_len == 512
    assert pipe.grid() == (H, W) and pipe.sampling.top_k == 2048 and pipe.guidance.cfg_scale == 3.0
    assert (pipe.prompt_suffix, pipe.negative_prompt, pipe.chat_template) == (EMU3_PROMPT_SUFFIX,
                                                                              EMU3_NEGATIVE_PROMPT, EMU3_CHAT_TEMPLATE)
    ours, expected = mixed_prompt_logits(pipe, ref)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def emu3_prefix_allowed_tokens_fn(h: int, w: int):
    """Emu3's Emu3PrefixConstrainedLogitsHelper (image_generation.py), as the reference notes describe it: the
    offset from the first <|image token|> decides what may come next."""
    visual, offsets = list(range(FIRST_VISUAL, FIRST_VISUAL + N_CODES)), {}

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        if batch_id not in offsets:
            offsets[batch_id] = (input_ids == IMG).nonzero()[0, 0].item()
        offset = input_ids.shape[0] - offsets[batch_id]
        if offset % (w + 1) == 0:
            return [EOL]
        if offset == (w + 1) * h + 1:
            return [EOF]
        if offset == (w + 1) * h + 2:
            return [EOI]
        if offset == (w + 1) * h + 3:
            return [EOS]
        if offset > (w + 1) * h + 3:
            return [PAD]
        return visual

    return allowed


def test_greedy_cfg_generation_matches_transformers(checkpoint, pipe):
    """The released path: transformers' unbatched CFG processor (a second model call per token with its own cache,
    log-softmax mix) then the prefix constraint, greedy. Ours runs [cond; uncond] as one left-padded batch with the
    same log-prob mix, so the two differ only by float rounding (~1e-6); the smallest top-1/top-2 gap on this
    prompt is ~1e-3, so the greedy tokens must agree exactly."""
    _, _, _, ref = checkpoint
    for rows in pipe.draw_stream(["a red circle"], cfg_scale=3.0, temperature=0):
        pass
    meta = [ord(c) for c in f"{H}*{W}"]   # single-byte ranks: one token per character
    cond = [BOS, *"a red circle".encode(), *EMU3_PROMPT_SUFFIX.encode(), BOI, *meta, IMG]
    negative = [BOS, *EMU3_NEGATIVE_PROMPT.encode(), BOI, *meta, IMG]
    n_new = H * (W + 1) + 3
    out = ref.generate(torch.tensor([cond]), attention_mask=torch.ones(1, len(cond), dtype=torch.long),
                       negative_prompt_ids=torch.tensor([negative]), guidance_scale=3.0,
                       prefix_allowed_tokens_fn=emu3_prefix_allowed_tokens_fn(H, W), do_sample=False,
                       max_new_tokens=n_new + 5, eos_token_id=EOS, pad_token_id=PAD)
    generated = out[0, len(cond):]
    assert generated.tolist() == rows.tokens[0].tolist()                     # stopped at EOS, same tokens
    assert len(generated) == n_new and len(set(rows.codes.flatten().tolist())) > 4   # not a degenerate image
    with torch.no_grad():
        expected = ref.decode_image_tokens(image_tokens=generated[None], height=H, width=W)
        ours = pipe.vq.decode(rows.codes)
    assert ours.shape == expected.shape == (1, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_greedy_answer_matches_transformers(checkpoint, pipe):
    """Image understanding through Pipeline.answer, which bans visual tokens from the answer: the reference gets
    the same ban through prefix_allowed_tokens_fn."""
    _, _, _, ref = checkpoint
    image = tensor_to_image(image_pixels()[0])
    pipe.resize = dict(min_pixels=0)   # keep the 16x16 image (the released rule would grow it to 512x512)
    try:
        answer = pipe.answer(image, "What is it?", max_new_tokens=12)
    finally:
        pipe.resize = None
    x = image_to_tensor(image, factor=2, min_pixels=0)[None]
    ids = torch.tensor([pipe.layout.understanding_prompt(pipe.vq.encode(x)[0], "What is it?", pipe.tokenizer,
                                                          EMU3_CHAT_TEMPLATE)])
    ids = ids.masked_fill((ids >= FIRST_VISUAL) | (ids == EOL), ID["<image>"])
    text_only = list(range(FIRST_VISUAL))
    out = ref.generate(ids, pixel_values=x, image_sizes=torch.tensor([[SIDE, SIDE]]), do_sample=False,
                       max_new_tokens=12, prefix_allowed_tokens_fn=lambda batch_id, input_ids: text_only,
                       eos_token_id=EOS, pad_token_id=PAD)[0, ids.size(1):].tolist()
    out = out[:out.index(EOS)] if EOS in out else out
    assert answer == pipe.tokenizer.decode(out) and len(out) > 0


def test_original_layout_gives_the_same_logits(checkpoint, pipe):
    hf, llm, vq, ref = checkpoint
    original = load_emu3(llm, vq_path=vq, dtype=torch.float32)
    assert original.layout == pipe.layout and original.image_area == SIDE * SIDE
    ours, expected = mixed_prompt_logits(original, ref)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    codes = torch.randint(0, N_CODES, (1, H, W))
    assert torch.equal(original.vq.decode(codes), pipe.vq.decode(codes))


def test_transformers_in_memory_names_single_file(checkpoint, pipe, tmp_path):
    """A state dict saved as is from transformers >= 4.52 (model.text_model.*, lm_head, model.vqmodel.*)."""
    hf, _, _, ref = checkpoint
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(hf / name, tmp_path / name)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = load_emu3(tmp_path, dtype=torch.float32)
    ours, expected = mixed_prompt_logits(loaded, ref)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_load(checkpoint, pipe):
    loaded = load_emu3(checkpoint[0])   # default dtype: bf16 GPT, fp32 VQ, as in the released demos
    assert {p.dtype for p in loaded.gpt.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vq.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in loaded.gpt.parameters()) and not loaded.gpt.training
    for name, p in loaded.gpt.named_parameters():
        torch.testing.assert_close(p, pipe.gpt.get_parameter(name).bfloat16(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ clear errors


@pytest.fixture
def hf_copy(checkpoint, tmp_path):
    return Path(shutil.copytree(checkpoint[0], tmp_path / "hf"))


def test_truncated_shard(hf_copy):
    shard = sorted(hf_copy.glob("model-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"cannot read .*{shard.name}: .*truncated or corrupt"):
        load_emu3(hf_copy, dtype=torch.float32)


def test_index_names_a_missing_shard(hf_copy):
    shard = sorted(hf_copy.glob("model-00003-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json names the shard {shard.name}, which "
                                                rf"is missing"):
        load_emu3(hf_copy, dtype=torch.float32)


def test_wrong_folder(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Emu3 folder .*nowhere does not exist"):
        load_emu3(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        load_emu3(tmp_path)
    hf, llm, vq, _ = checkpoint
    with pytest.raises(ValueError, match=r"-hf checkpoint, which holds the VQ itself: leave vq_path"):
        load_emu3(hf, vq_path=vq)
    with pytest.raises(ValueError, match=r"is the vision tokenizer \(Emu3-VisionTokenizer\): pass it as vq_path"):
        load_emu3(vq)
    with pytest.raises(ValueError, match=r"original-layout Emu3 checkpoint, whose VQ is a separate download: pass "
                                         r"vq_path="):
        load_emu3(llm)
    with pytest.raises(ValueError, match=r"model_type 'Emu3', not the vision tokenizer"):
        load_emu3(llm, vq_path=llm)


def test_missing_tokenizer_file(hf_copy, checkpoint, tmp_path):
    (hf_copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*tokenizer.json \(-hf layout"):
        load_emu3(hf_copy)
    _, llm, vq, _ = checkpoint
    original = Path(shutil.copytree(llm, tmp_path / "gen"))
    (original / "emu3_vision_tokens.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"emu3_vision_tokens.txt is missing"):
        load_emu3(original, vq_path=vq)


def test_config_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "hidden_size": 4096, "vocab_size": 128256}))
    with pytest.raises(ValueError, match=r"config.json describes a model of model_type 'llama', not Emu3"):
        load_emu3(tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"num_hidden_layers": 3}, "9 missing keys: layers.2.input_layernorm.weight, layers.2.mlp.down_proj.weight"),
    ({"num_hidden_layers": 1}, "9 unexpected keys: layers.1.input_layernorm.weight, layers.1.mlp.down_proj.weight"),
    ({"intermediate_size": 100}, "6 shape mismatches: layers.0.mlp.down_proj.weight: checkpoint (64, 96) vs model "
                                 "(64, 100)"),
])
def test_missing_unexpected_and_misshapen_keys(hf_copy, change, expected):
    config = json.loads((hf_copy / "config.json").read_text())
    config["text_config"] |= change
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_emu3(hf_copy, dtype=torch.float32)
    assert "(-hf layout) into GPT" in str(err.value) and expected in str(err.value)


def test_tokenizer_that_does_not_fit_the_model(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    config["text_config"]["bos_token_id"] = 7
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit the model: config.json bos_token_id is 7, the tokenizer's "
                                         r"<\|extra_203\|> is 462"):
        load_emu3(hf_copy)


# ------------------------------------------------------------------------------------------------ sample.py


def test_sample_py_draws_a_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "cat.png"
    sample.main(sample.parse_args(["--weights", str(checkpoint[0]), "--prompt", "a cat", "--seed", "0",
                                   "--device", "cpu", "--dtype", "float32", "--out", str(out)]))
    assert Image.open(out).size == (SIDE, SIDE)
    printed = capsys.readouterr()
    assert f"row    {H}/{H}" in printed.err and "tokens/s" in printed.err and "ETA" in printed.err
    assert f"wrote {out}" in printed.out


# ------------------------------------------------------------------------------------------------ by Hub id

from hub_cache import COMMIT, offline_cache, write_folder  # noqa: E402, F401 (offline_cache is a fixture)
from nano_emu.emu3 import EMU3_FILES, EMU3_VQ_FILES  # noqa: E402


def test_load_by_hub_id_offline(checkpoint, offline_cache):
    """The -hf folder as BAAI/Emu3-Gen-hf, the original two as BAAI/Emu3-Gen + BAAI/Emu3-VisionTokenizer (pinned to
    a commit), in a cache laid out as huggingface_hub's (hub_cache.py) that holds only the files the loader's
    allow_patterns select: those are enough, and they leave the release's remote code and extras behind."""
    hf, llm, vq, ref = checkpoint
    write_folder(offline_cache, "BAAI/Emu3-Gen-hf", hf, EMU3_FILES)
    write_folder(offline_cache, "BAAI/Emu3-Gen", llm, EMU3_FILES)
    write_folder(offline_cache, "BAAI/Emu3-VisionTokenizer", vq, EMU3_VQ_FILES)
    for loaded in (load_emu3("BAAI/Emu3-Gen-hf", dtype=torch.float32),
                   load_emu3("BAAI/Emu3-Gen", vq_path=f"BAAI/Emu3-VisionTokenizer@{COMMIT}", dtype=torch.float32)):
        ours, expected = mixed_prompt_logits(loaded, ref)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(HubError, match=r"BAAI/Emu3-Chat-hf is not in the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        load_emu3("BAAI/Emu3-Chat-hf")
    # BAAI/Emu3-Gen's files as the reference notes list them: the remote code and tokenizer config stay behind
    from huggingface_hub.utils import filter_repo_objects
    released = ["config.json", "configuration_emu3.py", "modeling_emu3.py", "tokenization_emu3.py",
                "emu3.tiktoken", "emu3_vision_tokens.txt", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json", "model.safetensors.index.json",
                *[f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]]
    assert sorted(filter_repo_objects(released, allow_patterns=EMU3_FILES)) == sorted(
        ["config.json", "emu3.tiktoken", "emu3_vision_tokens.txt", "model.safetensors.index.json",
         *[f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]])
