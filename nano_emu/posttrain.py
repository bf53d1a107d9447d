"""Post-training: the second half of Emu3's recipe, on any tiny run (posttrain.py is its command).

Emu3 is pretrained, then quality fine-tuned (QFT: next-token training on its best data, the learning rate annealed
linearly to zero), then aligned with DPO on judged drawings of its own (the Emu3 paper, "Post-training"). Here the
data is the run's own drawings, judged exactly by its world (World.reward: the checker, or for a folder the model
reading its drawing back). Round after round:

1. rollouts: K drawings of each of P prompts of the training split (held-out prompts are never drawn), through the
   Pipeline a user samples with (a model with plans writes its plan first). Every drawing is kept as its token
   string with the log-probs of its tokens under the model that drew it and under the pretrained reference, in
   rollouts/round_NNN.safetensors, written before the round is trained on: a resumed run reads the same round;
2. `steps_per_round` steps of train.fit (the one loop: atomic checkpoints, exact resume, Ctrl-C), each batch half
   rollouts, half ordinary pretraining examples (the anchor, which keeps captions and answers alive):

- "rft": rejection-sampling fine-tuning, next-token loss on the accepted drawings: QFT at toy scale;
- "dpo": Emu3's DPO on an accepted and a rejected drawing of one prompt: -log sigmoid(beta * margin), margin the
  two drawings' log-prob gain over the reference (Rafailov et al. 2023), plus `ce` x next-token loss on the chosen;
- "grpo": group-relative advantages over a prompt's K drawings, PPO's clipped ratio against the log-probs they were
  drawn with and a KL penalty to the reference (Shao et al. 2024; Flow-GRPO and AR-GRPO for image models);
- "continue": no rollouts, the anchor alone: pretraining longer, the baseline a curve is read against.

The losses see the tokens the model chose (image codes, plan words), not the prompt nor the markers the grid
constraint forces. The learning rate falls linearly to zero over the stage (QFT's schedule). The curve
(curve.jsonl): the checker's overall score, seen and held-out, against minutes of post-training.
"""

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import answer, draw
from .layout import Plan
from .pipeline import Pipeline
from .train import VISUAL_WEIGHT, Distributed, Pool, batch_rng, fit, linear_to_zero, sequences, weighted_loss
from .world import World

METHODS = ("rft", "dpo", "grpo", "continue")


@dataclass
class Settings:
    method: str = "rft"
    rounds: int = 8
    prompts: int = 128           # drawn per round, each `k` times
    k: int = 8
    steps_per_round: int = 100
    batch: int = 24              # half rollouts, half anchor ("continue": all anchor)
    lr: float = 1e-4
    cfg: float = 2.0             # how rollouts are drawn (GRPO is on-policy at cfg 1, temperature 1)
    temperature: float = 1.0
    beta: float = 0.1            # DPO
    ce: float = 1.0              # DPO: weight of the next-token loss on the chosen drawing
    clip: float = 0.2            # GRPO: PPO's ratio clip
    kl: float = 0.05             # GRPO: weight of the KL penalty to the reference
    judge: str = "checker"       # or "self": the model's reading of its own drawing, even where a checker exists
    balance: bool = False        # rft: accepted drawings picked category by category (rare successes weigh more)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.judge not in ("checker", "self"):
            raise ValueError(f"judge must be 'checker' or 'self', got {self.judge!r}")

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round


# ---------------------------------------------------------------------------------------------------------------
# token strings and their log-probs


def in_plan(layout, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L-1) bool: the targets inside a plan (its words and the EOP that closes it)."""
    if not layout.has_plans:
        return torch.zeros_like(ids[:, 1:], dtype=torch.bool)
    inputs = ids[:, :-1]
    return (torch.cumsum((inputs == layout.bop).long(), 1) - torch.cumsum((inputs == layout.eop).long(), 1)).bool()


def chosen_mask(layout, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L-1) float: 1 at the targets the model chose when it drew (image codes, plan words and
    the EOP it ended the plan with), 0 at the prompt, the forced markers and the padding."""
    return (layout.is_visual(ids[:, 1:]) | in_plan(layout, ids)).float()


def token_logprobs(model, ids: torch.Tensor, layout) -> torch.Tensor:
    """ids (B, L) -> (B, L-1): log p(ids[:, t+1] | ids[:, :t+1]), teacher-forced, under the distribution the
    sampler draws each chosen token from: an image code among the visual tokens only (the grid constraint), a plan
    word among what a plan may hold (Pipeline.write_plans); other targets over the whole vocabulary. So a drawing's
    log-prob is the sum of the log-probs the sampler drew it with (at temperature 1, cfg 1: tested)."""
    logits = model(ids[:, :-1]).float()                                      # (B, L-1, V)
    vocab = logits.shape[-1]
    allowed = torch.ones(3, vocab, dtype=torch.bool, device=logits.device)   # 0: anything, 1: a code, 2: a plan word
    allowed[1] = False
    allowed[1, layout.first_visual:layout.first_visual + layout.codebook_size] = True
    if layout.has_plans:
        allowed[2] = layout.plan_mask(vocab, logits.device)
    kind = layout.is_visual(ids[:, 1:]).long() + 2 * in_plan(layout, ids).long()   # (B, L-1)
    logits = logits.masked_fill(~allowed[kind.to(logits.device)], float("-inf"))
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]


def rollout_strings(layout, tokenizer, captions: list[str], plans: list[str] | None,
                    codes: torch.Tensor) -> torch.Tensor:
    """The generation strings of drawings, right-padded: (N, L) ids."""
    rows = [layout.encode([c, *([Plan(plans[i])] if plans else []), x], tokenizer, eos=True)
            for i, (c, x) in enumerate(zip(captions, codes))]
    ids = torch.full((len(rows), max(map(len, rows))), layout.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


@torch.no_grad()
def all_logprobs(model, ids: torch.Tensor, layout, batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([token_logprobs(model, ids[i:i + batch_size].to(device), layout).cpu()
                      for i in range(0, len(ids), batch_size)])


# ---------------------------------------------------------------------------------------------------------------
# the losses (each on a batch of rollouts: ids (B, L), mask (B, L-1), and the round's tensors of those rows)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), sequence log-probs (B,) each; mean over pairs."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def group_advantages(reward: torch.Tensor, group: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: each reward against its group's (one prompt's K drawings) mean, in its group's stds."""
    advantages = torch.zeros_like(reward)
    for g in group.unique():
        index = group == g
        r = reward[index]
        advantages[index] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return advantages


def grpo_loss(logprobs, old, ref, mask, advantages, clip: float, kl: float) -> torch.Tensor:
    """Per token: -min(ratio A, clip(ratio) A) + kl * (exp(ref - lp) - (ref - lp) - 1), the k3 estimate of
    KL(policy || reference); averaged over the chosen tokens of the batch. Tensors (B, T); advantages (B,)."""
    logprobs, old, ref = logprobs * mask, old * mask, ref * mask   # outside the mask: ratio 1, no penalty
    ratio = (logprobs - old).exp()
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_ratio = ref - logprobs
    penalty = log_ratio.exp() - log_ratio - 1
    return ((-surrogate + kl * penalty) * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# rounds: draw, judge, keep


def reader_of(pipe: Pipeline):
    """The model reading drawings back: (pixels, question) -> greedy answers ("" asks for a caption)."""
    return lambda pixels, question: answer(pipe, pixels, [question] * len(pixels))


def draw_round(pipe: Pipeline, world: World, settings: Settings, round_: int, reference) -> tuple[dict, dict]:
    """One round of rollouts: tensors (ids, mask, reward, group, codes, category; DPO: the reference's log-probs,
    GRPO: the drawing policy's too) and what else to keep (the captions, plans, acceptance, seconds)."""
    start = time.perf_counter()
    rng = np.random.default_rng([settings.seed, 11, round_])
    captions, targets = world.rollout_tasks(settings.prompts, rng)
    prompts = [c for c in captions for _ in range(settings.k)]
    options = dict(cfg_scale=settings.cfg, temperature=settings.temperature, top_k=None, top_p=None)
    if settings.method == "grpo":   # on-policy: the distribution the loss differentiates
        options.update(cfg_scale=1.0, temperature=1.0)
    codes, plans = [], []
    chunk = 256
    for i in range(0, len(prompts), chunk):
        for rows in pipe.draw_stream(prompts[i:i + chunk], seed=settings.seed * 100003 + round_ * 1009 + i,
                                     **options):
            pass
        codes.append(rows.codes.cpu())
        plans += rows.plans or []
    codes = torch.cat(codes).view(len(prompts), *rows.codes.shape[1:])
    pixels = np.stack([np.asarray(image) for image in pipe.decode(codes)])
    reader = reader_of(pipe) if settings.judge == "self" or not world.checker else None
    reward = world.reward(pixels, prompts, [t for t in targets for _ in range(settings.k)], reader)
    ids = rollout_strings(pipe.layout, pipe.tokenizer, prompts, plans or None, codes)
    categories = [world.category(t) for t in targets]
    names = sorted(set(categories))
    tensors = dict(ids=ids, mask=chosen_mask(pipe.layout, ids), reward=torch.tensor(reward, dtype=torch.float32),
                   group=torch.arange(len(captions)).repeat_interleave(settings.k), codes=codes,
                   category=torch.tensor([names.index(c) for c in categories]).repeat_interleave(settings.k))
    if settings.method == "grpo":   # the policy that drew them, for the clipped ratio
        tensors["old"] = all_logprobs(pipe.gpt, ids, pipe.layout)
    if settings.method in ("dpo", "grpo"):
        tensors["ref"] = all_logprobs(reference, ids, pipe.layout)
    pipe.release()
    accepted = {name: float(reward[np.repeat(np.array(categories) == name, settings.k)].mean()) for name in names}
    info = dict(round=round_, captions=captions, plans=plans or None, accepted=float(reward.mean()),
                accepted_by_category=accepted, seconds=round(time.perf_counter() - start, 1))
    return tensors, info


def round_path(out: Path, round_: int) -> Path:
    return out / "rollouts" / f"round_{round_:03d}.safetensors"


def load_or_draw(out: Path, pipe, world, settings, round_, reference) -> tuple[dict, dict]:
    path = round_path(out, round_)
    if path.is_file():   # a resumed run trains on the round it drew before it stopped
        tensors, info, _ = load_checkpoint(path)
        return tensors, info
    tensors, info = draw_round(pipe, world, settings, round_, reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, tensors, info)
    return tensors, info


# ---------------------------------------------------------------------------------------------------------------
# the stage


def make_loss(pipe: Pipeline, world: World, settings: Settings, anchor: Pool, sequence_options: dict, out: Path,
              reference, log) -> callable:
    """fit's loss_fn: (net, step) -> (loss, logs). Draws (or reads) round step // steps_per_round at its first
    step; every batch: half the round's rollouts (by the method's rule), half the anchor."""
    layout, tokenizer, device = pipe.layout, pipe.tokenizer, pipe.gpt.lm_head.weight.device
    current = {}

    def anchor_loss(net, rng, n):
        pick = rng.integers(len(anchor.codes), size=n)
        inputs, targets, weights = sequences(layout, tokenizer, anchor.codes[pick], [anchor.captions[i] for i in pick],
                                             [anchor.answers[i] for i in pick], rng, **sequence_options,
                                             plans=None if anchor.plans is None else [anchor.plans[i] for i in pick])
        return weighted_loss(net(inputs.to(device)), targets.to(device), weights.to(device))

    def loss_fn(net, step):
        rng = batch_rng(settings.seed, 0, step)
        if settings.method == "continue":
            loss = anchor_loss(net, rng, settings.batch)
            return loss, {"loss": loss.detach(), "anchor": loss.detach()}
        round_ = step // settings.steps_per_round
        if current.get("round") != round_:
            was = pipe.gpt.training
            pipe.gpt.eval()
            current.update(round=round_, data=load_or_draw(out, pipe, world, settings, round_, reference)[0])
            pipe.gpt.train(was)
            log(round_, current["data"])
        data, half = current["data"], settings.batch // 2
        rollout, logs = rollout_loss(net, data, rng, half, layout, settings, sequence_options, device)
        anchored = anchor_loss(net, rng, settings.batch - half)
        loss = anchored if rollout is None else rollout + anchored
        return loss, {"loss": loss.detach(), "anchor": anchored.detach(), **logs}

    return loss_fn


def rollout_loss(net, data: dict, rng: np.random.Generator, n: int, layout, settings: Settings,
                 sequence_options: dict, device) -> tuple[torch.Tensor | None, dict]:
    """The method's loss on n rollouts of the round (None where the round offers none: nothing accepted, no
    group with both a success and a failure)."""
    reward, group = data["reward"], data["group"]
    if settings.method == "rft":
        accepted = torch.nonzero(reward > 0)[:, 0].numpy()
        if not len(accepted):
            return None, {}
        if settings.balance:   # a category first, then one of its accepted drawings
            by_category = [accepted[data["category"][accepted].numpy() == c] for c in data["category"].unique()]
            by_category = [index for index in by_category if len(index)]
            pick = np.array([by_category[c][rng.integers(len(by_category[c]))]
                             for c in rng.integers(len(by_category), size=n)])
        else:
            pick = accepted[rng.integers(len(accepted), size=n)]
        ids, mask = data["ids"][pick], data["mask"][pick]
        visual = layout.is_visual(ids[:, 1:]).float()
        weights = mask * (sequence_options.get("visual_weight", VISUAL_WEIGHT) * visual + (1 - visual))
        loss = weighted_loss(net(ids[:, :-1].to(device)), ids[:, 1:].to(device), weights.to(device))
        return loss, {"rollout": loss.detach()}
    if settings.method == "dpo":
        pairs = []
        for g in group.unique().tolist():
            index = torch.nonzero(group == g)[:, 0].numpy()
            good, bad = index[reward[index] > 0], index[reward[index] == 0]
            if len(good) and len(bad):
                pairs.append((good, bad))
        if not pairs:
            return None, {}
        chosen, rejected = [], []
        for j in rng.integers(len(pairs), size=max(1, n // 2)):
            good, bad = pairs[j]
            chosen.append(good[rng.integers(len(good))])
            rejected.append(bad[rng.integers(len(bad))])
        pick = np.array(chosen + rejected)
        ids, mask = data["ids"][pick].to(device), data["mask"][pick].to(device)
        logprobs = token_logprobs(net, ids, layout).masked_fill(mask == 0, 0.0)   # -inf where a mask is 0
        sums, ref = (logprobs * mask).sum(1), (data["ref"][pick].to(device) * mask).sum(1)
        half = len(chosen)
        preference = dpo_loss(sums[:half], sums[half:], ref[:half], ref[half:], settings.beta)
        ce = -(logprobs[:half] * mask[:half]).sum() / mask[:half].sum()
        return preference + settings.ce * ce, {"dpo": preference.detach(), "chosen_ce": ce.detach()}
    # grpo: only groups with both outcomes teach anything (the others' advantages are all 0)
    advantages = group_advantages(reward, group)
    useful = torch.nonzero(advantages != 0)[:, 0].numpy()
    if not len(useful):
        return None, {}
    pick = useful[rng.integers(len(useful), size=n)]
    ids, mask = data["ids"][pick].to(device), data["mask"][pick].to(device)
    logprobs = token_logprobs(net, ids, layout).masked_fill(mask == 0, 0.0)
    loss = grpo_loss(logprobs, data["old"][pick].to(device), data["ref"][pick].to(device), mask,
                     advantages[pick].to(device), settings.clip, settings.kl)
    return loss, {"grpo": loss.detach()}


def post_train(pipe: Pipeline, world: World, settings: Settings, anchor: Pool, sequence_options: dict, out: Path,
               meta: dict, resume: bool = False, ckpt_every: int = 50, after_round=None) -> list:
    """Post-train pipe.gpt in place (checkpoints to out/gpt.safetensors with `meta`); after_round(round, seconds)
    is called after the last step of each round (the curve). Returns fit's history."""
    reference = None
    if settings.method in ("dpo", "grpo"):
        reference = copy.deepcopy(pipe.gpt).eval().requires_grad_(False)
    rounds = []

    def log(round_, data):
        rounds.append(round_)
        tqdm.write(f"round {round_}: {len(data['reward'])} drawings, {float(data['reward'].mean()):.1%} accepted")

    loss_fn = make_loss(pipe, world, settings, anchor, sequence_options, out, reference, log)

    def after_step(step):
        if after_round is not None and (step + 1) % settings.steps_per_round == 0:
            after_round(step // settings.steps_per_round)

    pipe.gpt.train()
    history = fit(pipe.gpt, loss_fn, settings.steps, settings.lr, out / "gpt.safetensors",
                  {**meta, "posttrain": asdict(settings)}, Distributed(), ckpt_every=ckpt_every, resume=resume,
                  schedule=linear_to_zero, after_step=after_step,
                  desc=f"post-train ({settings.method})")
    pipe.gpt.eval()
    return history


# ---------------------------------------------------------------------------------------------------------------
# measuring: a quick score for the curve, memorisation, best of K


def quick_scores(pipe: Pipeline, world: World, repeats: int, seed: int) -> dict[str, float]:
    """The curve's points, on world.draw_tasks(repeats) (the evaluation's prompts, fewer draws each): the checker's
    headline for seen and held-out prompts at the run's CFG and at cfg 1 ("seen_cfg2"), and each of its rates
    ("seen_cfg2_position", "seen_cfg2_square_fill")."""
    scores, cfg = {}, pipe.guidance.cfg_scale
    for group, (captions, targets) in world.draw_tasks(repeats).items():
        for g in (cfg, 1.0):
            drawn = draw(pipe, captions, frames=world.frames, cfg_scale=g, seed=seed)
            rates = world.score(drawn, targets)
            scores[f"{group}_cfg{g:g}"] = rates.pop("adherence")
            scores.update({f"{group}_cfg{g:g}_{name}": value for name, value in rates.items()})
    pipe.release()
    return scores


def memorised(pipe: Pipeline, world: World, out: Path, repeats: int, seed: int) -> float:
    """The share of the evaluation's seen drawings (at the run's CFG) whose code grid is exactly the grid of a
    drawing the stage drew (any round's rollouts): copying, not drawing."""
    grids = set()
    for path in sorted((out / "rollouts").glob("round_*.safetensors")):
        tensors, _, _ = load_checkpoint(path)
        grids |= {tuple(c.flatten().tolist()) for c in tensors["codes"]}
    tasks = world.draw_tasks(repeats)
    # the evaluation's seen prompts; a world without them (a folder): its showcase captions, 8 drawings each
    captions = tasks["seen"][0] if "seen" in tasks else [c for c in world.showcase()[0] for _ in range(8)]
    copies = 0
    for i in range(0, len(captions), 512):
        for rows in pipe.draw_stream(captions[i:i + 512], seed=seed + i // 512):
            pass
        copies += sum(tuple(c.flatten().tolist()) in grids for c in rows.codes.cpu())
    pipe.release()
    return copies / len(captions)


def best_of_k(pipe: Pipeline, world: World, captions: list[str], targets: list, k: int, seed: int) -> dict:
    """Test-time selection, no training: draw each prompt k times; pass@k is the checker's best of k (the ceiling
    post-training can sharpen toward), pass@1 its first draw, and self@k the checker's verdict on the one drawing
    the model itself reads as its prompt: of the drawings World.self_check accepts (all, where it accepts none),
    the one whose prompt it finds likeliest as its caption (Pipeline.answer_logprob; clips: the first). Each is the
    mean over the world's categories of the mean over their prompts, as GenEval's overall."""
    prompts = [c for c in captions for _ in range(k)]
    pixels = draw(pipe, prompts, frames=world.frames, seed=seed)   # (len(captions) * k, ...)
    right = np.array(world.judge(pixels, [t for t in targets for _ in range(k)]), dtype=bool).reshape(len(captions), k)
    accepted = np.array(world.self_check(pixels, prompts, [t for t in targets for _ in range(k)], reader_of(pipe)),
                        dtype=bool).reshape(len(captions), k)
    likely = np.zeros(accepted.shape) if world.frames else np.reshape(pipe.answer_logprob(list(pixels), prompts),
                                                                       accepted.shape)
    chosen = np.lexsort((likely, accepted))[:, -1]   # accepted first, then the likeliest reading
    pipe.release()
    categories = np.array([world.category(t) for t in targets])

    def overall(hits: np.ndarray) -> float:
        return float(np.mean([hits[categories == c].mean() for c in dict.fromkeys(categories)]))
    return {"pass@1": overall(right[:, 0]), f"pass@{k}": overall(right.any(1)),
            f"self@{k}": overall(right[np.arange(len(captions)), chosen]), "self_accepts": float(accepted.mean())}


def read_curve(out: Path) -> list[dict]:
    path = out / "curve.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def minutes(seconds: float) -> float:
    return round(seconds / 60, 2) if math.isfinite(seconds) else seconds
