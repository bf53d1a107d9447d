"""Post-train a finished tiny run on its own judged drawings: the second half of Emu3's recipe (QFT, DPO, GRPO).

    python posttrain.py --run out/scenes --out out/scenes_rft                 # rejection-sampling fine-tuning
    python posttrain.py --run out/scenes --out out/scenes_grpo --method grpo  # group-relative policy optimisation
    python posttrain.py --run out/scenes --out out/scenes_dpo --method dpo    # Emu3's DPO
    python posttrain.py --run out/scenes --out out/scenes_more --method continue   # pretraining longer, the baseline
    python posttrain.py --run out/scenes --out out/scenes_rft --resume        # continue after a crash or Ctrl-C
    python posttrain.py --run out/scenes --best-of 8                          # pass@8 and self-verified best of 8

Each round draws K pictures of P training prompts (never a held-out one), the world's checker judges them (a
folder's: the model's own reading), and the GPT trains on them (nano_emu/posttrain.py). --out becomes a run folder
like train_tiny.py's: sample.py --ckpt reads it; metrics.json sits beside metrics_before.json (the pretrained run's),
curve.png plots the score against minutes of post-training. docs/post_training.md has the measurements.
"""

import json
import sys
from pathlib import Path

from nano_emu import cli, recipe
from nano_emu.checkpoint import FolderInUse, RunMismatch, output_lock
from nano_emu.folder import FolderError
from nano_emu.posttrain import METHODS, Settings, best_of_k
from nano_emu.recipe import UsageError

DEFAULTS = Settings()


def main(args):
    args.run = Path(args.run)
    if args.best_of:
        return best_of(args)
    if args.out is None:
        raise UsageError("--out: the folder to write the post-trained run to (a new one, or --resume's)")
    args.out = Path(args.out)
    if args.out.resolve() == args.run.resolve():
        raise UsageError(f"--out {args.out} is the run itself: post-training writes a new run folder beside it")
    with output_lock(args.out):
        return recipe.post_train_run(args)


def best_of(args) -> dict:
    """--best-of K: pass@1, pass@K and the self-verified best of K on the evaluation's prompts (no training)."""
    run_args = recipe.run_settings(args.run)
    world = recipe.make_worlds(run_args)[0]
    if not world.checker:
        raise UsageError(f"--best-of scores drawings with the world's checker, which the {world.name} world lacks")
    from nano_emu.tiny import load_tiny
    pipe = load_tiny(args.run, device=cli.resolve_device(args.device))
    result = {}
    for group, (captions, targets) in world.draw_tasks(1).items():
        scores = best_of_k(pipe, world, captions, targets, args.best_of, seed=args.seed)
        result.update({f"{k}_{group}": round(v, 4) for k, v in scores.items()})
        print(f"{group}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    (args.run / f"best_of_{args.best_of}.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv=None):
    count, rate = cli.at_least(1), cli.above(0)
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[1], usage="%(prog)s --run DIR --out DIR [options]")
    p.add_argument("--run", type=cli.existing_folder, required=True, metavar="DIR", help="a finished train_tiny.py run")
    p.add_argument("--out", type=cli.output_folder, default=None, metavar="DIR", help="the post-trained run's folder")
    p.add_argument("--method", choices=METHODS, default=DEFAULTS.method, help="(default: rft)")
    p.add_argument("--resume", action="store_true", help="continue the post-training in --out")
    p.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=cli.at_least(0), default=DEFAULTS.seed)
    p.add_argument("--ckpt-every", type=count, default=50, metavar="N", help="checkpoint every N steps")
    rounds = p.add_argument_group("rounds: draw, judge, train")
    rounds.add_argument("--rounds", type=count, default=DEFAULTS.rounds, metavar="N")
    rounds.add_argument("--prompts", type=count, default=DEFAULTS.prompts, metavar="P", help="training prompts a round")
    rounds.add_argument("--k", type=cli.at_least(2), default=DEFAULTS.k, help="drawings per prompt")
    rounds.add_argument("--steps-per-round", type=count, default=DEFAULTS.steps_per_round, metavar="S")
    rounds.add_argument("--batch", type=cli.at_least(2), default=DEFAULTS.batch, help="half rollouts, half anchor")
    rounds.add_argument("--lr", type=rate, default=DEFAULTS.lr, help="annealed linearly to zero")
    rounds.add_argument("--cfg", type=cli.above(0), default=DEFAULTS.cfg, help="rollouts' CFG (grpo: 1)")
    rounds.add_argument("--temperature", type=rate, default=DEFAULTS.temperature, metavar="T",
                        help="rollouts' temperature (grpo: 1)")
    rounds.add_argument("--judge", choices=["checker", "self"], default=DEFAULTS.judge,
                        help="self: the model reads its drawings back")
    rounds.add_argument("--balance", action="store_true", help="rft: accepted drawings picked category by category")
    rounds.add_argument("--anchor-pool", type=count, default=4000, metavar="N",
                        help="pretraining examples mixed into every batch")
    losses = p.add_argument_group("losses")
    losses.add_argument("--beta", type=rate, default=DEFAULTS.beta, help="dpo: the preference's temperature")
    losses.add_argument("--ce", type=cli.at_least(0, float), default=DEFAULTS.ce, help="dpo: next-token loss on chosen")
    losses.add_argument("--clip", type=rate, default=DEFAULTS.clip, help="grpo: the ratio's clip")
    losses.add_argument("--kl", type=cli.at_least(0, float), default=DEFAULTS.kl, help="grpo: KL to the reference")
    measure = p.add_argument_group("measuring")
    measure.add_argument("--sample-cfg", type=cli.above(0), default=None, metavar="G",
                         help="the post-trained run's own CFG, saved in it (default: the run's)")
    measure.add_argument("--curve-every", type=count, default=2, metavar="R", help="a curve point every R rounds")
    measure.add_argument("--curve-repeats", type=count, default=3, metavar="N", help="draws per curve prompt")
    measure.add_argument("--best-of", type=cli.at_least(2), default=None, metavar="K",
                         help="no training: pass@K and the self-verified best of K of --run")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    # the run, the folder, the flags: one line, exit 2
    except (UsageError, FolderError, FolderInUse, RunMismatch) as e:
        cli.ArgumentParser(prog="posttrain.py").error(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
