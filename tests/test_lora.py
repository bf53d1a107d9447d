"""nano_emu/lora.py: LoRA and the head-rows delta on a tiny random GPT: the base is what trains nothing, merged
equals unmerged, unmerge gives back the very weights, the peft files round-trip, and what does not fit is refused.
(peft itself loading these files onto transformers' models: tests/test_finetune_release.py.)"""

import json

import pytest
import torch

from nano_emu import lora
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.lora import AdapterMismatch, LoRAConfig


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(300, dim=32, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=64, **overrides))


def randomize_adapters(gpt, seed=1):
    """B starts at zero (the model starts as the base); give every delta values so that merging means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def test_lora_starts_as_the_base_and_trains_only_the_adapters():
    base, gpt = tiny_gpt(), tiny_gpt()
    paths = lora.add_lora(gpt, LoRAConfig(rank=4, alpha=8))
    assert len(paths) == 2 * 7 and paths[0] == "layers.0.self_attn.q_proj"
    trainable = sorted(n for n, p in gpt.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {k for k in gpt.state_dict() if "lora_" not in k} == set(base.state_dict())   # the base keeps its names
    torch.testing.assert_close(gpt(IDS), base(IDS), atol=0, rtol=0)   # B = 0: exactly the base
    gpt(IDS).sum().backward()
    assert all(p.grad is None for n, p in gpt.named_parameters() if not p.requires_grad)
    assert gpt.layers[0].self_attn.q_proj.lora_B.weight.grad.abs().sum() > 0


def test_merged_equals_unmerged_and_unmerge_is_exact():
    gpt = tiny_gpt()
    lora.add_lora(gpt, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "lm_head")))
    randomize_adapters(gpt)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    unmerged = gpt(IDS)
    merged_state = lora.merged_state(gpt)
    lora.merge(gpt)
    torch.testing.assert_close(gpt(IDS), unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.equal(gpt.layers[0].self_attn.q_proj.weight, before["layers.0.self_attn.q_proj.weight"])
    for key, tensor in merged_state.items():
        assert torch.equal(gpt.state_dict()[key], tensor), key   # merged_state is what merge computes
    lora.unmerge(gpt)
    for key, tensor in gpt.state_dict().items():
        assert torch.equal(tensor, before[key]), key   # bit for bit, not W + BA - BA
    plain = tiny_gpt()
    plain.load_state_dict(merged_state)   # a plain GPT's keys, strictly
    torch.testing.assert_close(plain(IDS), unmerged, atol=1e-5, rtol=1e-5)
    lora.unload(gpt)
    assert not lora.deltas(gpt) and type(gpt.lm_head) is torch.nn.Linear
    torch.testing.assert_close(gpt(IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_image_head_rows_train_alone():
    base, gpt = tiny_gpt(), tiny_gpt()
    lora.add_row_delta(gpt, 100, 300)
    assert [n for n, p in gpt.named_parameters() if p.requires_grad] == ["lm_head.rows"]
    torch.testing.assert_close(gpt(IDS), base(IDS), atol=0, rtol=0)
    randomize_adapters(gpt)
    changed = gpt(IDS) - base(IDS)
    assert changed[..., :100].abs().max() == 0 and changed[..., 100:].abs().min() > 0   # only image-token logits move
    merged = lora.merged_state(gpt)
    assert torch.equal(merged["lm_head.weight"][:100], base.lm_head.weight[:100])
    plain = tiny_gpt()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(IDS), gpt(IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank, message", [(0, "rank must be a positive integer .* got 0: rank 0 would train"),
                                           (-2, "rank must be a positive integer")])
def test_rank_zero_is_refused(rank, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(rank=rank)


def test_unknown_targets_are_refused():
    with pytest.raises(ValueError, match="targets must be some of .* got wq"):
        LoRAConfig(targets=("q_proj", "wq"))


def test_peft_files_round_trip(tmp_path):
    gpt = tiny_gpt()
    config = LoRAConfig(rank=4, alpha=8)
    lora.add_lora(gpt, config)
    randomize_adapters(gpt)
    weights = {p: (m.lora_A.weight, m.lora_B.weight) for p, m in lora.deltas(gpt).items()}
    lora.save_adapter(lora.Adapter(config, weights, "^(?:layers\\.\\d+\\..*)$", "my/base", "abc123"), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == \
        ("LORA", 4, 8, "my/base")
    adapter = lora.read_adapter(tmp_path)
    assert adapter.base_fingerprint == "abc123" and set(adapter.weights) == set(weights)
    other = tiny_gpt()
    lora.attach(other, {m: (a, b, lora.module_scaling(adapter, m)) for m, (a, b) in adapter.weights.items()},
                str(tmp_path))
    torch.testing.assert_close(other(IDS), gpt(IDS), atol=1e-6, rtol=1e-6)


def test_an_adapter_for_other_shapes_is_refused(tmp_path):
    gpt = tiny_gpt()
    lora.add_lora(gpt, LoRAConfig(rank=2))
    weights = {p: (m.lora_A.weight.detach(), m.lora_B.weight.detach(), 1.0) for p, m in lora.deltas(gpt).items()}
    wider = GPT(GPTConfig.tiny(300, dim=48, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=64))
    with pytest.raises(AdapterMismatch, match=r"does not fit this base model: layers.0.self_attn.q_proj: lora_A "
                                              r"\(2, 32\) / lora_B \(32, 2\), but the module maps 48 -> 48"):
        lora.attach(wider, weights, "an adapter")
    shallow = GPT(GPTConfig.tiny(300, dim=32, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=64))
    with pytest.raises(AdapterMismatch, match=r"layers.1.self_attn.q_proj: no such projection"):
        lora.attach(shallow, weights, "an adapter")
    assert not lora.deltas(shallow)   # refused before anything was wrapped


def test_what_is_not_a_lora_adapter_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        lora.read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="describes a 'IA3' adapter"):
        lora.read_adapter(tmp_path)
