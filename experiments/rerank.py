"""Which self-judge picks the best of K drawings? The model's own greedy reading (World.self_check, a yes/no),
against two graded scores from the same GPT:

    pmi:  log p(drawing | caption, plan) - log p(drawing | "")   (the implicit classifier that CFG sharpens with)
    read: log p(caption EOS | drawing)                           (Pipeline.answer_logprob: the caption's likelihood)

and the yes/no with a graded tie-break (self+read is posttrain.best_of_k's pick). The checker scores whichever
drawing each rule picks; docs/post_training.md has the table.

    python experiments/rerank.py --run out/scenes_plan --k 8 --repeats 4
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nano_emu import recipe
from nano_emu.posttrain import all_logprobs, reader_of, rollout_strings
from nano_emu.tiny import load_tiny


def drawings(pipe, prompts, seed):
    codes, plans, pixels = [], [], []
    for i in range(0, len(prompts), 256):
        for rows in pipe.draw_stream(prompts[i:i + 256], seed=seed + i):
            pass
        codes.append(rows.codes.cpu())
        plans += rows.plans or []
        pixels += [np.asarray(image) for image in pipe.decode(rows.codes)]   # 256 at a time: the decoder's memory
    return torch.cat(codes), plans or None, np.stack(pixels)


def visual_sum(pipe, ids):
    logprobs = all_logprobs(pipe.gpt, ids, pipe.layout)
    return (logprobs * pipe.layout.is_visual(ids[:, 1:])).sum(1)


def pmi(pipe, prompts, plans, codes):
    conditional = visual_sum(pipe, rollout_strings(pipe.layout, pipe.tokenizer, prompts, plans, codes))
    unconditional = visual_sum(pipe, rollout_strings(pipe.layout, pipe.tokenizer, [""] * len(prompts), None, codes))
    return (conditional - unconditional).numpy()


def main(args):
    pipe = load_tiny(args.run)
    world = recipe.make_worlds(recipe.run_settings(args.run))[0]
    result = {}
    for group, (captions, targets) in world.draw_tasks(args.repeats).items():
        n, k = len(captions), args.k
        prompts = [c for c in captions for _ in range(k)]
        many = [t for t in targets for _ in range(k)]
        codes, plans, pixels = drawings(pipe, prompts, args.seed)
        right = np.array(world.judge(pixels, many), dtype=bool).reshape(n, k)
        accepted = np.array(world.self_check(pixels, prompts, many, reader_of(pipe)), dtype=float).reshape(n, k)
        scores = {"pmi": pmi(pipe, prompts, plans, codes).reshape(n, k),
                  "read": np.reshape(pipe.answer_logprob(list(pixels), prompts), (n, k))}
        picks = {"first": np.zeros(n, dtype=int), "self": accepted.argmax(1),
                 "pmi": scores["pmi"].argmax(1), "read": scores["read"].argmax(1)}
        for name in ("pmi", "read"):   # accepted first, the graded score among equals
            picks[f"self+{name}"] = np.lexsort((scores[name], accepted))[:, -1]
        categories = np.array([world.category(t) for t in targets])

        def overall(hits):
            return float(np.mean([hits[categories == c].mean() for c in dict.fromkeys(categories)]))
        row = {f"pass@{k}": overall(right.any(1))}
        row |= {name: overall(right[np.arange(n), pick]) for name, pick in picks.items()}
        result[group] = row
        print(f"{group}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()), flush=True)
    Path(args.run, f"rerank_{args.k}x{args.repeats}_seed{args.seed}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="each evaluation prompt this many times")
    main(p.parse_args())
