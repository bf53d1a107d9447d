"""Ablations of the tiny GPT stage on one fixed, already trained VQ.

    python experiments/ablate_gpt.py --vq out/vq/vq.safetensors --tag words -- --tokenizer words --gpt-steps 800

Everything after `--` is a train_tiny.py flag. Runs train_tiny.py's own GPT stage and evaluation (the same
metrics.json numbers) and appends one JSON line to experiments/results_gpt.jsonl with the GPT seconds.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tiny  # noqa: E402
from nano_emu.checkpoint import load_checkpoint  # noqa: E402
from nano_emu.train import Distributed  # noqa: E402
from nano_emu.vq import VQConfig, VQModel  # noqa: E402
from nano_emu.weights import load_state_dict_strict  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--vq", required=True)
p.add_argument("--tag", default="")
p.add_argument("--keep", default=None, help="output folder to keep (default: a temporary one)")
p.add_argument("--results", default="results_gpt.jsonl", help="the jsonl in experiments/ that gets the row")
ours, rest = sys.argv[1:], []
if "--" in ours:
    i = ours.index("--")
    ours, rest = ours[:i], ours[i + 1:]
mine = p.parse_args(ours)

out = Path(mine.keep or tempfile.mkdtemp())
args = train_tiny.parse_args(rest + ["--out", str(out), "--device", "cpu"])
train_tiny.fill_from_preset(args)
out.mkdir(parents=True, exist_ok=True)
args.out = out
state, meta, _ = load_checkpoint(mine.vq)
vq = VQModel(VQConfig(**meta["config"]))
load_state_dict_strict(vq, state, source=mine.vq)
vq.eval()
start = time.time()
plan = train_tiny.prepare(args)
gpt, history = train_tiny.gpt_stage(args, plan.worlds, plan.tokenizer, plan.tokenizer_spec, plan.layout, vq,
                                    torch.device("cpu"), Distributed(), nullcontext())
gpt_s = time.time() - start
metrics = train_tiny.evaluate_run(args, plan.worlds, vq, gpt, plan.layout, plan.tokenizer)
eval_s = time.time() - start - gpt_s
row = dict(tag=mine.tag, flags=" ".join(rest), gpt_s=round(gpt_s, 1), eval_s=round(eval_s, 1),
           final_loss=history[-1]["loss"], **metrics)
print(json.dumps(row))
with open(Path(__file__).with_name(mine.results), "a") as f:
    f.write(json.dumps(row) + "\n")
