"""Steps per second of the design choices in the tiny-model table, timed in ONE process, interleaved, so that
the two cores' drift hits every variant alike ("equal wall time" comparisons).

    python experiments/throughput.py
"""
import time

import numpy as np
import torch

from nano_emu import shapes
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.tokenizer import ByteTokenizer, WordTokenizer
from nano_emu.train import batch_rng, init_vq_for_training, sequences, weighted_loss
from nano_emu.vq import VQConfig, VQModel
from nano_emu.image import to_tensor


def vq_variant(**overrides):
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny(**overrides))
    init_vq_for_training(vq)
    opt = torch.optim.Adam(vq.parameters(), 1e-3)

    def step(i):
        out = vq(to_tensor(shapes.sample_shapes(8, batch_rng(0, 0, i))[0]))
        opt.zero_grad(), out.loss.backward(), opt.step()
    return step


def gpt_variant(tokenizer):
    layout = Layout.tiny(256, text_vocab=tokenizer.n_vocab)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.tiny(layout.vocab_size, dim=128, n_layer=4, intermediate_size=336))
    opt = torch.optim.AdamW(gpt.parameters(), 3e-3)
    _, captions, _ = shapes.sample_shapes(24, 0)
    codes = torch.randint(0, 256, (24, 8, 8))

    def step(i):
        inputs, targets, weights = sequences(layout, tokenizer, codes, captions, [[("", c)] for c in captions],
                                             np.random.default_rng(i))
        loss = weighted_loss(gpt(inputs), targets, weights)
        opt.zero_grad(), loss.backward(), opt.step()
    return step


variants = {
    "VQ, time axis (temporal_factor 4), batch 8": vq_variant(temporal_factor=4),
    "VQ, no time axis (temporal_factor 1), batch 8": vq_variant(temporal_factor=1),
    "GPT dim 128 x 4, byte captions, batch 24": gpt_variant(ByteTokenizer()),
    "GPT dim 128 x 4, word captions, batch 24": gpt_variant(WordTokenizer(shapes.vocabulary())),
}
times = {name: [] for name in variants}
for rep in range(8):
    for name, step in variants.items():
        start = time.perf_counter()
        for i in range(5):
            step(rep * 5 + i)
        times[name].append((time.perf_counter() - start) / 5)
print(f"{'variant':48s} ms/step  steps/s   (median of 7 rounds of 5 steps, interleaved; threads {torch.get_num_threads()})")
for name, t in times.items():
    ms = 1000 * np.median(t[1:])
    print(f"{name:48s} {ms:7.1f}  {1000 / ms:7.2f}")
