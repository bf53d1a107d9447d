"""Fine-tuning each released family at tiny random size, in its released layout (transformers' own Emu3 and Chameleon
classes, LlamaGen's key layout from the reference-written fixture): a few steps on a generated folder lower the
loss; the model saved back loads in transformers (or LlamaGen's layout through nano_emu's loader) and gives the
fine-tuned model's logits; peft.PeftModel with the saved adapter gives nano_emu's logits with the adapter."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tiktoken")
pytest.importorskip("tokenizers")

from nano_emu import finetune as stage  # noqa: E402
from nano_emu import load_emu3, load_llamagen  # noqa: E402
from nano_emu.lora import LoRAConfig  # noqa: E402
from nano_emu.release import apply_adapter, load_base  # noqa: E402
from test_chameleon import IMAGE, tiny_reference, tiny_tokenizer  # noqa: E402
from test_emu3 import SIDE, TEXT, VOCAB, tiny_emu3  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen"
CAPTIONS = ["a red square", "a blue square", "a green square"]
COLORS = [(230, 30, 30), (30, 30, 230), (30, 200, 30)]


def captioned_folder(root: Path, side: int, n: int = 12) -> Path:
    """Squares of three colours at random places, captioned by colour, as a metadata.jsonl imagefolder."""
    rng, rows = np.random.default_rng(0), []
    root.mkdir(parents=True)
    for i in range(n):
        pixels = np.full((side, side, 3), 255, np.uint8)
        x, y = rng.integers(0, side // 2, size=2)
        pixels[y:y + side // 2, x:x + side // 2] = COLORS[i % 3]
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % 3]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def options(family, base, data, out, **more):
    values = dict(family=family, base=str(base), data=str(data), out=str(out), steps=15, batch=4, lr=1e-2,
                  warmup=2, samples=0, device="cpu", lora=LoRAConfig(rank=4, alpha=8))
    return stage.Options(**{**values, **more})


def finetuned(opts):
    torch.set_num_threads(1)
    job = stage.prepare(opts, log=lambda *a: None)
    metrics = stage.finish(job, stage.train(job))
    assert metrics["final_loss"] < metrics["first_loss"] - 0.2, metrics   # a few steps lower the loss
    return job, metrics


def ids_of(vocab, seed=0, length=30):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def ours(gpt, ids):
    with torch.no_grad():
        return gpt(ids)


# ------------------------------------------------------------------------------------------------ Emu3


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    """(the -hf folder, the original LLM folder, the original VQ folder) of one tiny random Emu3, unsharded."""
    return tiny_emu3(tmp_path_factory)[:3]


def test_emu3_gen_hf_lora_saves_what_transformers_and_peft_load(emu3, tmp_path):
    hf, _, _ = emu3
    data = captioned_folder(tmp_path / "data", SIDE)
    job, _ = finetuned(options("emu3", hf, data, tmp_path / "run", task="draw", save_merged=True))
    assert job.recipe.task == "draw"
    ids = ids_of(VOCAB)
    expected = ours(job.base.pipe.gpt, ids)                # nano_emu's fine-tuned model (adapters merged)

    merged = transformers.Emu3ForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert set(load_file(tmp_path / "run" / "model" / "model.safetensors")) == set(load_file(hf / "model.safetensors"))
    reloaded = load_emu3(tmp_path / "run" / "model", dtype=torch.float32)
    torch.testing.assert_close(ours(reloaded.gpt, ids), expected, atol=1e-5, rtol=1e-5)

    base = transformers.Emu3ForConditionalGeneration.from_pretrained(hf).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    assert not any("vqmodel" in name for name, _ in adapted.named_modules() if name.endswith("lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_emu3_chat_original_layout_answers_and_saves_back(emu3, tmp_path):
    """The original two-folder layout, the answer task (loss on the answer only): the LLM folder comes back with
    the release's names (transformers' own Emu3ForCausalLM reads them), and peft wraps that class's names."""
    _, llm, vq = emu3
    data = captioned_folder(tmp_path / "data", SIDE)
    job, metrics = finetuned(options("emu3", llm, data, tmp_path / "run", vq=str(vq), task="answer",
                                     question="What is it?", image_area=SIDE * SIDE, save_merged=True))
    assert "nll_heldout_answer" in metrics and "caption_accuracy_heldout" in metrics
    out = tmp_path / "run" / "model"
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "emu3.tiktoken",
                                               "emu3_vision_tokens.txt", "finetune.json"}
    ids = ids_of(VOCAB)
    expected = ours(job.base.pipe.gpt, ids)
    torch.testing.assert_close(ours(load_emu3(out, vq_path=vq, dtype=torch.float32).gpt, ids), expected,
                               atol=1e-5, rtol=1e-5)
    causal = transformers.Emu3ForCausalLM(transformers.Emu3TextConfig(**TEXT)).eval()
    causal.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(causal(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    base = transformers.Emu3ForCausalLM(transformers.Emu3TextConfig(**TEXT)).eval()
    base.load_state_dict(load_file(llm / "model.safetensors"), strict=True)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Chameleon


@pytest.fixture(scope="module")
def anole(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_reference(tok, swin_norm=False, n_kv=4, seed=0)
    folder = tmp_path_factory.mktemp("anole_hf")
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def raw_logits(model, ids):
    """transformers' Chameleon forward masks the image tokens' logits; its head does not."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state)


def test_chameleon_image_head_trains_only_image_rows_and_saves_the_hf_layout(anole, tmp_path):
    data = captioned_folder(tmp_path / "data", IMAGE)
    job, _ = finetuned(options("chameleon", anole, data, tmp_path / "run", mode="image-head", image_size=IMAGE))
    before = transformers.ChameleonForConditionalGeneration.from_pretrained(anole).eval()
    after = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").eval()
    ids = ids_of(before.config.vocab_size)
    torch.testing.assert_close(raw_logits(after, ids), ours(job.base.pipe.gpt, ids), atol=1e-5, rtol=1e-5)
    layout = job.base.pipe.layout
    start, stop = layout.first_visual, layout.first_visual + layout.codebook_size
    changed = (after.lm_head.weight - before.lm_head.weight).abs().sum(1)
    assert changed[start:stop].min() > 0 and changed[:start].max() == changed[stop:].max() == 0   # Anole's rows only
    for name, p in after.named_parameters():
        if name != "lm_head.weight":
            assert torch.equal(p, before.get_parameter(name)), name


def test_chameleon_lora_adapter_loads_in_peft(anole, tmp_path):
    data = captioned_folder(tmp_path / "data", IMAGE)
    job, _ = finetuned(options("chameleon", anole, data, tmp_path / "run", image_size=IMAGE))
    base = transformers.ChameleonForConditionalGeneration.from_pretrained(anole).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    ids = ids_of(base.config.vocab_size)
    torch.testing.assert_close(raw_logits(adapted.base_model.model, ids), ours(job.base.pipe.gpt, ids),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ LlamaGen


def class_folders(root: Path, names, side=16, per_class=6) -> Path:
    rng = np.random.default_rng(1)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((side, side, 3), np.uint8)
            x, y = rng.integers(0, side // 2, size=2)
            pixels[y:y + side // 2, x:x + side // 2] = COLORS[k % 3]
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_llamagen_lora_saves_the_authors_layout_and_the_adapter_round_trips(tmp_path):
    data = class_folders(tmp_path / "data", ["3", "7"])
    opts = options("llamagen", FIXTURE / "gpt.pt", data, tmp_path / "run", vq=str(FIXTURE / "vq.pt"),
                   image_size=16, n_head=4, save_merged=True)
    job, _ = finetuned(opts)
    saved = tmp_path / "run" / "model" / "gpt.pt"
    state = torch.load(saved, weights_only=True)["model"]      # tensors only
    reference = torch.load(FIXTURE / "gpt.pt", weights_only=True)["model"]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items() if k != "freqs_cis"}
    v = job.base.pipe.gpt.config.vocab_size
    ids = torch.cat([torch.tensor([[v + 3], [v + 7]]), ids_of(v, length=15)], dim=1)   # class token, then codes
    expected = ours(job.base.pipe.gpt, ids)
    reloaded = load_llamagen(saved, FIXTURE / "vq.pt", image_size=16, n_head=4)
    torch.testing.assert_close(ours(reloaded.gpt, ids), expected, atol=1e-5, rtol=1e-5)
    base = load_llamagen(FIXTURE / "gpt.pt", FIXTURE / "vq.pt", image_size=16, n_head=4)   # + the fused-wqkv adapter
    apply_adapter(base, "llamagen", FIXTURE / "gpt.pt", tmp_path / "run" / "adapter")
    torch.testing.assert_close(ours(base.gpt, ids), expected, atol=1e-5, rtol=1e-5)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["rank_pattern"] == {"wqkv": 12} and adapter["alpha_pattern"] == {"wqkv": 24.0}


def test_llamagen_refuses_classes_it_has_no_index_for(tmp_path):
    data = class_folders(tmp_path / "data", ["3", "cat", "12"])
    with pytest.raises(stage.UsageError, match=r"the class\(es\) '12', 'cat' have no index in this class-to-image "
                                               r"model \(10 classes\)"):
        stage.prepare(options("llamagen", FIXTURE / "gpt.pt", data, tmp_path / "run", vq=str(FIXTURE / "vq.pt"),
                              image_size=16, n_head=4), log=lambda *a: None)
    (tmp_path / "map.json").write_text(json.dumps({"cat": 5, "12": 2}))
    job = stage.prepare(options("llamagen", FIXTURE / "gpt.pt", data, tmp_path / "run", vq=str(FIXTURE / "vq.pt"),
                                image_size=16, n_head=4, class_map=str(tmp_path / "map.json"), plan_only=True),
                        log=lambda *a: None)
    assert sorted({it.text for it in job.folder.train}) == ["2", "3", "5"]


def test_base_fingerprint_tells_same_shaped_models_apart(emu3, tmp_path):
    hf, llm, vq = emu3
    a = load_base("emu3", hf)
    b = load_base("emu3", llm, vq=vq)
    assert a.fingerprint == b.fingerprint and (a.layout, b.layout) == ("-hf", "original")   # the same weights
    assert a.fingerprint == load_base("emu3", hf, dtype=torch.bfloat16).fingerprint
