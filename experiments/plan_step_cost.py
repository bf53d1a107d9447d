"""What a plan costs a GPT training step: the scenes preset's GPT on its batches with and without plans, timed
interleaved in one process (random weights and random codes: a step's cost does not depend on their values).

    python experiments/plan_step_cost.py [--steps 40]

The ratio sets the plan run's steps for an equal-wall-time comparison (docs/post_training.md).
"""
import argparse
import time

import numpy as np
import torch

from nano_emu import recipe
from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout
from nano_emu.tiny import choose_tokenizer
from nano_emu.train import sequences, weighted_loss
from nano_emu.world import Scenes

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--steps", type=int, default=40)
args = p.parse_args()
preset = recipe.PRESETS["scenes"]
models, batches = {}, {}
for name, world in (("plain", Scenes()), ("plan", Scenes(plans=True))):
    tokenizer, _ = choose_tokenizer("words", [world])
    layout = Layout.tiny(256, text_vocab=tokenizer.n_vocab, plan=world.plans)
    torch.manual_seed(0)
    models[name] = GPT(GPTConfig.tiny(layout.vocab_size, dim=preset["gpt_dim"], n_layer=preset["gpt_layers"],
                                      intermediate_size=int(preset["gpt_dim"] * 8 / 3) // 16 * 16))
    examples = world.sample(preset["gpt_batch"] * args.steps, np.random.default_rng(0))
    codes = torch.randint(0, 256, (len(examples.captions), 8, 8))
    rng = np.random.default_rng(1)
    b = preset["gpt_batch"]
    batches[name] = [sequences(layout, tokenizer, codes[i:i + b], examples.captions[i:i + b],
                               examples.answers[i:i + b], rng, p_drop_caption=preset["p_drop_caption"],
                               visual_weight=preset["visual_weight"], answer_weight=preset["answer_weight"],
                               plans=None if examples.plans is None else examples.plans[i:i + b])
                     for i in range(0, len(codes), b)]
seconds = {name: 0.0 for name in models}
optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in models.items()}
for step in range(args.steps):
    for name in (("plain", "plan") if step % 2 else ("plan", "plain")):   # interleaved, alternating first
        inputs, targets, weights = batches[name][step]
        start = time.perf_counter()
        loss = weighted_loss(models[name](inputs), targets, weights)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()
        if step >= 5:   # the first steps warm the allocator
            seconds[name] += time.perf_counter() - start
        if step == 0:
            print(f"{name}: sequence length {inputs.shape[1]} tokens")
n = args.steps - 5
print(f"ms per step: plain {1e3 * seconds['plain'] / n:.1f}, plan {1e3 * seconds['plan'] / n:.1f}; "
      f"plan / plain {seconds['plan'] / seconds['plain']:.3f} ({torch.get_num_threads()} threads)")
