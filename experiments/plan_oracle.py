"""Where a plan model fails: drawing from the plan it writes itself against drawing from the picture's true plan
(the world's), on the same fresh prompts, scored by the checker. If the true plan does not help, the plans are right
and the drawing is what fails.

    python experiments/plan_oracle.py --ckpt out/scenes_plan [--n 300]
"""
import argparse

import numpy as np

from nano_emu import plans, scenes
from nano_emu.tiny import load_tiny

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--ckpt", required=True, help="a train_tiny.py --world scenes --plan run")
p.add_argument("--n", type=int, default=300, help="prompts per split")
args = p.parse_args()
pipe = load_tiny(args.ckpt)
rng = np.random.default_rng(5)
for split in ("train", "heldout"):
    _, captions, drawn = scenes.sample_scenes(args.n, rng, split)
    targets = [scenes.parse(c) for c in captions]
    for name, given in (("own plan", None), ("true plan", [plans.write(s.objects) for s in drawn])):
        images = []
        for i in range(0, args.n, 100):
            part = None if given is None else given[i:i + 100]
            for rows in pipe.draw_stream(captions[i:i + 100], seed=7 + i, plans=part):
                pass
            images += [np.asarray(x) for x in pipe.decode(rows.codes)]
        rates = scenes.geneval(np.stack(images), targets)
        overall = rates.pop("overall")
        print(f"{split:8s} {name:10s} overall {overall:.3f}  " + "  ".join(f"{k} {v:.2f}" for k, v in rates.items()))
