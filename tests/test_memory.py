"""nano_emu/memory.py: the plan's exact lines are exact, its activation estimate holds what the backward pass really
keeps (every tensor autograd saves in the forward, counted once), and the GPU figures docs/finetune.md quotes for
Emu3-Gen 8B follow from the released config on the meta device."""

import pytest
import torch

from nano_emu import lora, memory
from nano_emu.gpt import GPT, GPTConfig


def tiny(mode="lora"):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.tiny(1000, dim=128, n_layer=4, n_head=4, n_kv_head=2, intermediate_size=352,
                             max_seq_len=1024))
    if mode == "lora":
        lora.add_lora(gpt, lora.LoRAConfig(rank=8))
    return gpt


def saved_bytes(gpt, ids, select, checkpointing):
    """The bytes of every tensor autograd keeps for backward during the forward and the loss (storages once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = gpt(ids, select=select, checkpoint_layers=checkpointing)
        torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
    return sum(storages.values())


def test_exact_lines_count_every_parameter():
    gpt = tiny("lora")
    adapters = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    plan = memory.plan(gpt, 2, 64, 100, torch.float32)
    assert plan.weights == 4 * sum(p.numel() for p in gpt.parameters())
    assert (plan.grads, plan.optimizer) == (4 * adapters, 8 * adapters)
    assert plan.logits == 100 * 1000 * 12
    sharded = memory.plan(tiny("full"), 2, 64, 100, torch.bfloat16, ranks=4, fsdp=True)
    full = sum(p.numel() for p in tiny("full").parameters())
    assert (sharded.weights, sharded.grads, sharded.optimizer) == (4 * full // 4, 4 * full // 4, 8 * full // 4)
    assert sharded.gathered > 0 and "FSDP" in sharded.table()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_estimate_covers_what_backward_keeps(checkpointing):
    gpt = tiny("full")
    ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
    select = torch.ones(4, 256, dtype=torch.bool)
    select[:, :20] = False
    measured = saved_bytes(gpt, ids, select, checkpointing)
    plan = memory.plan(gpt, 4, 256, int(select.sum()), torch.float32, checkpointing=checkpointing)
    planned = plan.activations + plan.logits
    assert measured <= planned   # the plan is an upper estimate ...
    if not checkpointing:
        assert measured >= 0.6 * planned   # ... and not a loose one (it also counts the backward's logits gradient)


def test_fits_or_refuses_in_one_line():
    plan = memory.plan(tiny(), 2, 64, 100, torch.float32)
    assert memory.check_fits(plan, 10 * plan.total, torch.device("cpu")).startswith("fits:")
    with pytest.raises(MemoryError, match=r"^the memory plan needs .* per rank, and .* of RAM is free"):
        memory.check_fits(plan, plan.total, torch.device("cpu"))
    assert "unknown" in memory.check_fits(plan, None, torch.device("cpu"))


def emu3_8b(mode):
    with torch.device("meta"):
        gpt = GPT(GPTConfig.emu3_8b()).to(torch.float32 if mode == "full" else torch.bfloat16)
    if mode == "lora":
        lora.add_lora(gpt, lora.LoRAConfig(rank=8, alpha=16))
    return gpt


def test_emu3_8b_lora_fits_one_80gb_card_and_full_needs_fsdp():
    """docs/finetune.md's figures (experiments/finetune_plan.py): 720x720 strings of 8241 tokens, loss on 8193."""
    card = 80 * 10**9
    lora_plan = memory.plan(emu3_8b("lora"), 1, 8241, 8193, torch.bfloat16, checkpointing=True)
    assert memory.check_fits(lora_plan, card, torch.device("cuda")).startswith("fits: 34.0 GiB")
    full = emu3_8b("full")
    with pytest.raises(MemoryError, match="needs 144.4 GiB"):
        memory.check_fits(memory.plan(full, 1, 8241, 8193, torch.bfloat16, checkpointing=True), card,
                          torch.device("cuda"))
    sharded = memory.plan(full, 1, 8241, 8193, torch.bfloat16, ranks=8, fsdp=True, checkpointing=True)
    assert memory.check_fits(sharded, card, torch.device("cuda")).startswith("fits: 37.3 GiB")
