"""The memory plans of the GPU fine-tunes in docs/finetune.md, computed on the meta device (no download, no GPU):
Emu3-Gen 8B (the released config) with LoRA on one 80 GB card, and in full with FSDP on 8, at 720x720; Anole-7B's
image-head rows and LoRA at 512x512.

    python experiments/finetune_plan.py

The same function finetune.py prints before its first step (nano_emu/memory.py) on the same model it would
train: built here from GPTConfig.emu3_8b() with the parameters' stored dtypes and requires_grad set as
finetune.py sets them (frozen bf16 base + fp32 adapters; fp32 masters for --full).
"""

import torch

from nano_emu import lora, memory
from nano_emu.gpt import GPT, GPTConfig

GIB80 = 80 * 10**9   # an "80 GB" card: what torch.cuda.mem_get_info reports free on an idle H100/A100 80GB is ~79 GiB
GRID = 90            # 720x720 at 8 pixels per code
CAPTION = 40         # tokens of a caption with Emu3's prompt suffix (" masterpiece, film grained, best quality.")
BLOCK = 1 + 5 + 1 + GRID * (GRID + 1) + 2   # BOI "90*90" IMG rows+EOL EOF EOI
SEQ = 1 + CAPTION + BLOCK + 1               # BOS caption block EOS
LOSS = GRID * (GRID + 1) + 3                # what the model writes after IMG: rows, EOF, EOI, EOS


def model(mode: str, config: GPTConfig = GPTConfig.emu3_8b()) -> GPT:
    with torch.device("meta"):
        gpt = GPT(config).to(torch.float32 if mode == "full" else torch.bfloat16)
    if mode == "lora":
        lora.add_lora(gpt, lora.LoRAConfig(rank=8, alpha=16))
    elif mode == "image-head":   # Anole: Chameleon's 8192 image-token rows (ids 4..8195)
        lora.add_row_delta(gpt, 4, 4 + 8192)
    return gpt


def main():
    rows = [("Emu3-Gen 8B, LoRA r=8 on all projections, 1 GPU, batch 1, --checkpointing", "lora", 1, 1, False, True),
            ("Emu3-Gen 8B, LoRA r=8, 1 GPU, batch 2, --checkpointing", "lora", 2, 1, False, True),
            ("Emu3-Gen 8B, LoRA r=8, 1 GPU, batch 1, no checkpointing", "lora", 1, 1, False, False),
            ("Emu3-Gen 8B, --full, 1 GPU, batch 1, --checkpointing (refused)", "full", 1, 1, False, True),
            ("Emu3-Gen 8B, --full --fsdp, 8 GPUs, batch 1 per GPU, --checkpointing", "full", 1, 8, True, True),
            ("Emu3-Gen 8B, --full --fsdp, 8 GPUs, batch 2 per GPU, --checkpointing", "full", 2, 8, True, True)]
    print(f"sequence {SEQ} tokens ({GRID}x{GRID} codes), loss on {LOSS} positions per sample\n")
    plans = [(*row, SEQ, LOSS, GPTConfig.emu3_8b()) for row in rows]
    # Anole-7B (Chameleon 7B): BOS, ~40 caption tokens, BOI, 32x32 codes, EOI, EOS; loss on codes, EOI, EOS
    plans.append(("Anole-7B, --image-head, 1 GPU, batch 4, --checkpointing", "image-head", 4, 1, False, True,
                  1 + 40 + 1 + 1024 + 2, 1026, GPTConfig.chameleon("7B")))
    plans.append(("Anole-7B, LoRA r=8, 1 GPU, batch 4, --checkpointing", "lora", 4, 1, False, True,
                  1 + 40 + 1 + 1024 + 2, 1026, GPTConfig.chameleon("7B")))
    for title, mode, batch, ranks, fsdp, checkpointing, seq, loss, config in plans:
        gpt = model(mode, config)
        trained = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
        plan = memory.plan(gpt, batch, seq, batch * loss, torch.bfloat16, ranks, fsdp, checkpointing)
        try:
            verdict = memory.check_fits(plan, GIB80, torch.device("cuda"))
        except MemoryError as e:
            verdict = f"refused: {e}"
        print(f"{title}\n  {trained / 1e6:.1f}M trained parameters of {gpt.num_params() / 1e9:.2f}B")
        print("\n".join("  " + line for line in plan.table().splitlines()))
        print(f"  on an 80 GB card: {verdict}\n")


if __name__ == "__main__":
    main()
