"""Chameleon / Anole without the download: a tiny random ChameleonForConditionalGeneration saved by transformers is
the reference (logits, VQ codes, greedy answers), the same weights rewritten to Meta's original layout must load
to the same numbers, and the released sizes are counted on `meta`."""

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import ChameleonConfig, ChameleonForConditionalGeneration  # noqa: E402

from nano_emu.chameleon import HF_NAMES, HF_VQ_PREFIX, load_chameleon, rename_or_keep  # noqa: E402
from nano_emu.gpt import GPT, GPTConfig  # noqa: E402
from nano_emu.layout import Layout, LayoutError  # noqa: E402
from nano_emu.sampler import generate_text  # noqa: E402
from nano_emu.vq import VQConfig, VQModel  # noqa: E402
from nano_emu.weights import check_state_dict  # noqa: E402

N_CODES, IMAGE = 32, 32          # 32 codes; 32 px images through a 4x VQ -> 8x8 = 64 image tokens


def tiny_tokenizer(reserved: int = 0) -> Tokenizer:
    """Chameleon's id plan in small: <s> <pad> </s> <unk>, the IMGIMG tokens from id 4, <eoss>, <racm3:break>, the
    chat separator and <image>, then a byte-level alphabet as the 'text BPE' (and `reserved` <reservedNNNNN>
    specials after it, the release's block of unused ones)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    digits = "ABCDEFGHIJ"
    for code in range(N_CODES):
        vocab["IMGIMG" + "".join(digits[int(d)] for d in str(code)) + "Z"] = 4 + code
    for name in ("<eoss>", "<racm3:break>", "<reserved08706>", "<image>"):
        vocab[name] = len(vocab)
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for k in range(reserved):
        vocab[f"<reserved{8000 + k:05d}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<reserved08706>", "<image>"])
    return tok


def tiny_reference(tok: Tokenizer, swin_norm: bool, n_kv: int, seed: int) -> ChameleonForConditionalGeneration:
    vocab = tok.get_vocab(with_added_tokens=True)
    config = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=256, swin_norm=swin_norm, vocabulary_map=vocab,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, initializer_range=0.2,
        vq_config=dict(embed_dim=16, num_embeddings=N_CODES, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], resolution=IMAGE))
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():   # norms off their ones/zeros init; one qk-norm per layer shared by the heads (as released)
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("model.norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "_norm." in name:
                p.copy_((0.3 * torch.randn(p.shape[-1]) + (1 if name.endswith("weight") else 0)).expand_as(p))
            elif "vqmodel" in name and "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
    return model


def save_hf(model, tok, folder):
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_reference(tok, swin_norm=False, n_kv=4, seed=0)
    return model, tok, save_hf(model, tok, tmp_path_factory.mktemp("chameleon_hf"))


def reference_logits(model, ids):
    """Raw logits: transformers' forward sets the image tokens' logits to dtype-min, its lm_head does not."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state)


def ours_logits(pipe, ids):
    with torch.no_grad():
        return pipe.gpt(ids)


def test_logits_match_transformers_in_fp32(hf):
    model, _, folder = hf
    pipe = load_chameleon(folder, dtype=torch.float32, image_size=IMAGE)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours_logits(pipe, ids), reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    assert pipe.vq.decoder is None   # the -hf conversion has no decoder: encode only
    with pytest.raises(ValueError, match="no decoder"):
        pipe.vq.decode(torch.zeros(1, 8, 8, dtype=torch.long))


def test_swin_norm_and_gqa_logits_match_transformers(tmp_path):
    """The 30B's switches (swin-norm, grouped-query attention) on the same tiny scale."""
    tok = tiny_tokenizer()
    model = tiny_reference(tok, swin_norm=True, n_kv=2, seed=3)
    pipe = load_chameleon(save_hf(model, tok, tmp_path), dtype=torch.float32, image_size=IMAGE)
    assert pipe.gpt.config.swin_norm and pipe.gpt.config.n_kv_head == 2
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours_logits(pipe, ids), reference_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_vq_codes_and_greedy_answer_match_transformers(hf):
    """Image + question -> the same VQ codes and, through our layout's understanding prompt, the same greedy tokens
    as transformers' generate with pixel_values (its processor's BOI, <image> x 64, EOI, separator)."""
    model, tok, folder = hf
    pipe = load_chameleon(folder, dtype=torch.float32, image_size=IMAGE)
    pixels = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        theirs = model.model.vqmodel.encode(pixels).image_tokens.view(2, -1)
    codes = pipe.vq.encode(pixels)                                             # (2, 8, 8)
    assert torch.equal(codes.flatten(1), theirs)
    assert pipe.layout.boi == tok.token_to_id("<racm3:break>") and pipe.layout.first_visual == 4

    question = "what is it?"
    prompt = pipe.layout.understanding_prompt(codes[0], question, pipe.tokenizer, pipe.chat_template)
    vocab = tok.get_vocab(with_added_tokens=True)
    hf_ids = ([0] + tok.encode(question, add_special_tokens=False).ids + [vocab["<racm3:break>"]]
              + [vocab["<image>"]] * 64 + [vocab["<eoss>"], vocab["<reserved08706>"]])
    assert len(prompt) == len(hf_ids) and prompt[-1] == vocab["<reserved08706>"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([hf_ids]), pixel_values=pixels[:1], max_new_tokens=12,
                             do_sample=False)
    expected = out[0, len(hf_ids):].tolist()
    expected = expected[:expected.index(2)] if 2 in expected else expected
    not_image = ~pipe.layout.is_visual(torch.arange(pipe.gpt.config.vocab_size))   # what transformers allows
    ours = generate_text(pipe.gpt, pipe.layout, [prompt], max_new_tokens=12, allowed=not_image)[0]
    assert ours == expected and len(ours) > 0


def interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """gpt.py's rotate_half rows -> Meta's interleaved rows (the inverse of llamagen.interleaved_to_halves)."""
    head_dim = weight.shape[0] // n_heads
    order = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)], 1).flatten()
    return weight.view(n_heads, head_dim, -1)[:, order].reshape(weight.shape)


def write_original(model, tok, root):
    """The same weights as Meta released Chameleon: data/models/7b/{consolidated.pth, params.json} and
    data/tokenizer/{vqgan.ckpt (Lightning, with loss.* keys and a decoder), vqgan.yaml, text_tokenizer.json}."""
    cfg, sd = model.config, model.state_dict()
    names = {v.replace("{}", "(\\d+)"): k for k, v in {
        "tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
        "layers.{}.attention_norm": "model.layers.{}.input_layernorm",
        "layers.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
        **{f"layers.{{}}.attention.w{x}": f"model.layers.{{}}.self_attn.{x}_proj" for x in "qkvo"},
        **{f"layers.{{}}.attention.{x}_normalization": f"model.layers.{{}}.self_attn.{x}_norm" for x in "qk"},
        **{f"layers.{{}}.feed_forward.{w}": f"model.layers.{{}}.mlp.{m}"
           for w, m in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))}}.items()}
    import re
    original = {"rope.freqs": torch.randn(8)}
    for key, tensor in sd.items():
        if key.startswith(HF_VQ_PREFIX):
            continue
        module, leaf = key.rsplit(".", 1)
        for pattern, meta_name in names.items():
            m = re.fullmatch(pattern, module)
            if m:
                name = meta_name.format(*m.groups())
                break
        if name.endswith(("wq", "wk")):
            tensor = interleave(tensor, cfg.num_attention_heads if name.endswith("wq") else cfg.num_key_value_heads)
        if name.endswith("_normalization"):
            assert torch.equal(tensor, tensor[:1].expand_as(tensor))   # one LayerNorm shared by the heads
            tensor = interleave(tensor[0][:, None], 1)[:, 0]
        original[f"{name}.{leaf}"] = tensor.clone()
    models_dir, tok_dir = root / "models" / "7b", root / "tokenizer"
    models_dir.mkdir(parents=True)
    tok_dir.mkdir()
    torch.save(original, models_dir / "consolidated.pth")
    (models_dir / "params.json").write_text(json.dumps({"model_parallel_size": 1, "model": {
        "dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "swin_norm": False, "multiple_of": 32,
        "ffn_dim_multiplier": 96 / int(8 * 64 / 3) + 1e-9}}))
    vq_cfg = VQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(), embed_dim=16, codebook_size=N_CODES,
                      temporal_factor=1, z_channels=32, spatial_norm=False, l2_norm=False)
    torch.manual_seed(5)
    decoder = {k: v for k, v in VQModel(vq_cfg).state_dict().items() if k.startswith("decoder.")}
    vq = {k[len(HF_VQ_PREFIX):]: v for k, v in sd.items() if k.startswith(HF_VQ_PREFIX)}
    torch.save({"state_dict": {**vq, **decoder, "loss.discriminator.main.0.weight": torch.randn(4)}},
               tok_dir / "vqgan.ckpt")
    (tok_dir / "vqgan.yaml").write_text(
        "model:\n  params:\n    embed_dim: 16\n    n_embed: 32\n    ddconfig:\n      double_z: false\n"
        "      z_channels: 32\n      resolution: 32\n      in_channels: 3\n      out_ch: 3\n      ch: 32\n"
        "      ch_mult: [1, 2, 2]\n      num_res_blocks: 1\n      attn_resolutions: []\n      dropout: 0.0\n")
    tok.save(str(tok_dir / "text_tokenizer.json"))
    return models_dir


def test_original_layout_loads_the_same_model(hf, tmp_path):
    model, tok, _ = hf
    folder = write_original(model, tok, tmp_path / "data")
    pipe = load_chameleon(folder, dtype=torch.float32, image_size=IMAGE)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours_logits(pipe, ids), reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    pixels = torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pipe.vq.encode(pixels).flatten(1), model.model.vqmodel.encode(pixels).image_tokens.view(1, -1))
    assert pipe.vq.decode(pipe.vq.encode(pixels)).shape == (1, 3, IMAGE, IMAGE)   # vqgan.ckpt has the decoder


def test_loader_errors_name_the_problem(hf, tmp_path):
    model, tok, folder = hf
    with pytest.raises(FileNotFoundError, match="neither"):
        load_chameleon(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(ValueError, match="tensor-parallel shards"):
        load_chameleon(tmp_path)
    # a checkpoint missing a tensor and carrying a stray one: both listed, before any tensor is read
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((folder / name).read_bytes())
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.1.self_attn.q_norm.bias")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing keys: layers\.1\.self_attn\.q_norm\.bias.*unexpected keys: "
                                         r"model\.layers\.0\.self_attn\.extra\.weight"):
        load_chameleon(broken)


def hf_meta_model(size: str):
    kw = {"7B": {}, "30B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                                num_attention_heads=64, num_key_value_heads=8, swin_norm=True)}[size]
    config = ChameleonConfig(vocabulary_map={"<image>": 8711}, **kw)
    with torch.device("meta"):
        return ChameleonForConditionalGeneration(config)


@pytest.mark.parametrize("size, params", [("7B", 7_013_666_816), ("30B", 34_294_308_864)])
def test_released_sizes_on_meta(size, params):
    """transformers' full-size models (its defaults are the 7B's; the 30B's numbers are the reference notes') map name
    for name and shape for shape onto our presets, with equal parameter counts."""
    theirs = hf_meta_model(size).state_dict()
    with torch.device("meta"):
        gpt, vq = GPT(GPTConfig.chameleon(size)), VQModel(VQConfig.chameleon(), decoder=False)
    check_state_dict(gpt, {rename_or_keep(k, HF_NAMES): tuple(v.shape) for k, v in theirs.items()
                           if not k.startswith(HF_VQ_PREFIX)}, f"transformers Chameleon-{size}")
    check_state_dict(vq, {k[len(HF_VQ_PREFIX):]: tuple(v.shape) for k, v in theirs.items()
                          if k.startswith(HF_VQ_PREFIX)}, "transformers ChameleonVQVAE")
    assert gpt.num_params() == params == sum(v.numel() for k, v in theirs.items() if not k.startswith(HF_VQ_PREFIX))


# --- layout: BOI, h*w codes, EOI -------------------------------------------------------------------------------


class Chars:
    def encode(self, text):
        return [300 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 300) for i in ids)


def test_layout_block_round_trip_and_strictness():
    layout = Layout.chameleon(eoi=36, boi=37, codebook_size=32, image_grid=(2, 3))
    codes = torch.tensor([[0, 5, 31], [7, 7, 1]])
    block = layout.image_block(codes, Chars())
    assert block == [37, 4, 9, 35, 11, 11, 5, 36]
    parts = layout.decode([0, *Chars().encode("hi"), *block, *Chars().encode("ok"), 2], Chars())
    assert parts[0] == "hi" and torch.equal(parts[1], codes) and parts[2] == "ok"
    with pytest.raises(LayoutError, match="token 7: EOI after 5 visual tokens"):
        layout.decode([0, 37, 4, 9, 35, 11, 11, 36], Chars())
    with pytest.raises(LayoutError, match="followed by visual token"):
        layout.decode([0, *block[:-1], 4, 36], Chars())
    with pytest.raises(LayoutError, match="not EOI"):
        layout.decode([0, *block[:-1], 305], Chars())
    with pytest.raises(ValueError, match="2x3 codes"):
        layout.image_block(torch.zeros(3, 3, dtype=torch.long), Chars())
    assert layout.grid_schedule(2, 3) == [-1] * 6 + [36]
    assert layout.generation_prompt("a", 2, 3, Chars()) == [0, 397, 37]


# --- sampler: the 1024-block constraint, 3-way CFG, CD-K, completion -------------------------------------------

from nano_emu.sampler import GREEDY, Guidance, Sampling, cdk_scores, cfg_mix, cfg_mix3, generate_image  # noqa: E402


def tiny_chameleon_gpt(layout):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(layout.vocab_size + 400, n_layer=1, dim=32, n_head=2, n_kv_head=2,
                              intermediate_size=64, qk_norm=True)).eval()


def test_constrained_block_then_eoi_and_three_way_cfg():
    layout = Layout.chameleon(eoi=36, boi=37, codebook_size=32, image_grid=(3, 4))
    gpt = tiny_chameleon_gpt(layout)
    prompts = [layout.generation_prompt("ab", 3, 4, Chars())]
    uncond = [layout.generation_prompt("", 3, 4, Chars())]
    tokens, codes = generate_image(gpt, layout, prompts, 3, 4, negative_prompts=uncond, image_prompts=uncond,
                                   guidance=Guidance(cfg_scale=3.0, image_scale=1.2),
                                   sampling=Sampling(temperature=0.7, top_p=0.9),
                                   generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 13) and tokens[0, -1] == layout.eoi and codes.shape == (1, 3, 4)
    assert layout.decode_image([0, layout.boi, *tokens[0].tolist()], Chars()).equal(codes[0])
    # with no image in the prompt the image-only branch is the unconditional one: 3-way = 2-way at the text scale
    c, i = torch.randn(2, 50), torch.randn(2, 50)
    torch.testing.assert_close(cfg_mix3(c, i, i, 3.0, 1.2), cfg_mix(c, i, 3.0))
    three = generate_image(gpt, layout, prompts, 3, 4, negative_prompts=uncond, image_prompts=uncond,
                           guidance=Guidance(3.0, image_scale=1.2), sampling=GREEDY)[0]
    two = generate_image(gpt, layout, prompts, 3, 4, negative_prompts=uncond, guidance=Guidance(3.0),
                         sampling=GREEDY)[0]
    assert torch.equal(three, two)


def test_cdk_rule_on_fake_logits():
    """Candidates: p_cond >= alpha * (k-th largest p_cond); score log p_cond - log p_uncond; others -inf."""
    cond = torch.log(torch.tensor([[0.40, 0.30, 0.20, 0.06, 0.04]]))
    uncond = torch.log(torch.tensor([[0.50, 0.10, 0.30, 0.05, 0.05]]))
    scores = cdk_scores(cond, uncond, k=2, alpha=0.5)          # k-th (2nd) best 0.30 -> threshold 0.15
    expected = torch.tensor([[(0.4 / 0.5), (0.3 / 0.1), (0.2 / 0.3), 0.0, 0.0]]).log()
    expected[0, 3:] = float("-inf")
    torch.testing.assert_close(scores, expected)
    assert scores.argmax() == 1            # the token the prompt raises most, not the most likely one
    # k = 1 with alpha 1 keeps only the argmax (Li et al.'s rule at its strictest); masked tokens never come back
    assert torch.isfinite(cdk_scores(cond, uncond, k=1, alpha=1.0)).sum() == 1
    masked = cond.clone()
    masked[0, :4] = float("-inf")
    assert torch.isfinite(cdk_scores(masked, uncond, k=3, alpha=0.1)).tolist() == [[False] * 4 + [True]]


@pytest.mark.parametrize("layout", [Layout.chameleon(eoi=36, boi=37, codebook_size=32, image_grid=(3, 4)),
                                    Layout.tiny(codebook_size=32, text_vocab=400)])
def test_completion_keeps_rows_and_continues_like_the_full_draw(layout):
    """Greedy: completing from the first r rows of a greedy image gives that image back, and CD-K runs too."""
    gpt = tiny_chameleon_gpt(layout)
    prompts = [layout.generation_prompt("ab", 3, 4, Chars())] * 2
    uncond = [layout.generation_prompt("", 3, 4, Chars())] * 2
    kw = dict(negative_prompts=uncond, guidance=Guidance(cfg_scale=2.0), sampling=GREEDY)
    tokens, codes = generate_image(gpt, layout, prompts, 3, 4, **kw)
    for r in (1, 2):
        again, kept = generate_image(gpt, layout, prompts, 3, 4, keep=codes[:, :r], **kw)
        assert torch.equal(again, tokens) and torch.equal(kept, codes)
    other = torch.randint(0, 32, (2, 1, 4))
    assert torch.equal(generate_image(gpt, layout, prompts, 3, 4, keep=other, **kw)[1][:, :1], other)
    _, cdk = generate_image(gpt, layout, prompts, 3, 4, negative_prompts=uncond, guidance=Guidance(3.0, cdk_k=4),
                            sampling=GREEDY)
    assert cdk.shape == (2, 3, 4)


def test_sample_py_answers_and_completes(hf, tmp_path, capsys):
    """sample.py --chameleon: understanding on the -hf folder; completion on the original layout (it has a decoder)."""
    import sample
    from PIL import Image
    model, tok, folder = hf
    png = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()).save(png)   # square-cropped to 32x32
    sample.main(sample.parse_args(["--chameleon", str(folder), "--image-size", str(IMAGE), "--image", str(png),
                                   "--question", "what", "--max-new-tokens", "4", "--dtype", "float32"]))
    assert "in.png:" in capsys.readouterr().out
    original = write_original(model, tok, tmp_path / "data")
    out = tmp_path / "done.png"
    sample.main(sample.parse_args(["--chameleon", str(original), "--image-size", str(IMAGE), "--complete", str(png),
                                   "--keep-rows", "3", "--n", "2", "--out", str(out), "--dtype", "float32",
                                   "--cdk-k", "4"]))
    assert Image.open(out).size == (2 * IMAGE, IMAGE)


# --- what an answer may hold: the reference's text decoder's rule -----------------------------------------------


def reference_answer_mask(tokenizer_json, vocab_size: int) -> torch.Tensor:
    """The ids Chameleon's reference TextDecoder lets through (chameleon/inference/chameleon.py and vocab.py): EOS
    and VocabInfo.text_tokens, i.e. the tokenizer's model vocabulary minus the IMGIMG image tokens minus the
    "specials", a special being any name that starts with "<" except "<" itself; everything else is -inf."""
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[[i for name, i in vocab.items()
             if not name.startswith("IMGIMG") and not (name.startswith("<") and name != "<")]] = True
    allowed[vocab["</s>"]] = True
    return allowed


def test_answers_forbid_what_the_reference_forbids(tmp_path):
    """With 300 <reserved...> tokens in the vocabulary a random model's greedy answer wanders into them under a
    mask that only bans image tokens and markers (nano_emu's before); Layout.answer_mask now is the reference's
    mask exactly, and the answer is the reference rule's greedy answer."""
    tok = tiny_tokenizer(reserved=300)
    model = tiny_reference(tok, swin_norm=False, n_kv=4, seed=11)
    folder = save_hf(model, tok, tmp_path / "hf")
    pipe = load_chameleon(folder, dtype=torch.float32, image_size=IMAGE)
    V = pipe.gpt.config.vocab_size
    expected = reference_answer_mask(folder / "tokenizer.json", V)
    assert torch.equal(pipe.layout.answer_mask(V), expected)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert not expected[[vocab["<unk>"], vocab["<image>"], vocab["<reserved08706>"], vocab["<reserved08123>"]]].any()
    assert expected[vocab["<"]] and expected[vocab["</s>"]]

    image = torch.randint(0, 256, (IMAGE, IMAGE, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    pixels = pipe._pixels(image.numpy())[None]   # as Pipeline.answer reads it
    prompt = pipe.layout.understanding_prompt(pipe.vq.encode(pixels)[0], "what is it?", pipe.tokenizer,
                                              pipe.chat_template)
    before = replace(pipe.layout, answer_forbidden=()).answer_mask(V)   # the mask of the earlier code
    wandered = generate_text(pipe.gpt, pipe.layout, [prompt], max_new_tokens=24, allowed=before)[0]
    reserved = {i for name, i in vocab.items() if name.startswith("<reserved")}
    assert reserved & set(wandered), wandered   # the bug, reproduced on this model
    ours = generate_text(pipe.gpt, pipe.layout, [prompt], max_new_tokens=24, allowed=pipe.layout.answer_mask(V))[0]
    reference = generate_text(pipe.gpt, pipe.layout, [prompt], max_new_tokens=24, allowed=expected)[0]
    assert ours == reference and not reserved & set(ours) and len(ours) > 0
    assert pipe.answer(image.numpy(), "what is it?", max_new_tokens=24) == pipe.tokenizer.decode(reference)


# --- by Hub id -------------------------------------------------------------------------------------------------

from hub_cache import COMMIT, offline_cache, write_folder  # noqa: E402, F401 (offline_cache is a fixture)
from nano_emu.chameleon import CHAMELEON_FILES  # noqa: E402
from nano_emu.hub import HubError  # noqa: E402


def test_load_by_hub_id_offline(hf, offline_cache):
    model, _, folder = hf
    write_folder(offline_cache, "leloy/Anole-7b-v0.1-hf", folder, CHAMELEON_FILES)
    pipe = load_chameleon(f"leloy/Anole-7b-v0.1-hf@{COMMIT}", dtype=torch.float32, image_size=IMAGE)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours_logits(pipe, ids), reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(HubError, match=r"facebook/chameleon-7b is not in the Hugging Face cache"):
        load_chameleon("facebook/chameleon-7b")
