"""Fine-tuning a released model on a folder: LoRA, the image-token rows of the head, or every weight.

    job = prepare(options)            # base loaded, folder read and checked, codes cached, model set up, memory planned
    history = train(job)              # one train.fit stage: progress bar, atomic checkpoints, exact resume, Ctrl-C
    finish(job, history)              # adapter (peft) and/or model in the released layout, loss plot, metrics, grid

finetune.py (the script) fills `options` from its flags. What is trained (`mode`):
- "lora": LoRA on the decoder's projections (lora.py); the base frozen, stored in the compute dtype (bf16 on a
  GPU), the adapters in fp32. The run saves a peft adapter, and with save_merged the merged model as released.
- "image-head": only the output head's rows of the image tokens (Anole's recipe for Chameleon; lora.RowDelta).
- "full": every weight, fp32 masters with bf16 compute (autocast, or FSDP2's mixed precision policy).
Under torchrun every rank draws the same global batch (seeded by the step) and trains on its slice; the loss is
normalised by the global batch's loss weight, so gradients averaged over ranks are the one-process gradients:
one process and N ranks take the same steps (tests/test_finetune_fsdp.py). With fsdp, each decoder block and then
the root are sharded with torch.distributed.fsdp.fully_shard (FSDP2), and the checkpoints hold whole tensors.
"""

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import evaluate, lora, memory
from .checkpoint import SETTINGS_KEY, check_resume, read_meta, settings_of
from .engine import free_memory
from .finetune_data import FolderData, Recipe, batch, read_folder, tokenize
from .folder import FolderError
from .gpt import GPT
from .lora import LoRAConfig
from .release import SETTINGS_FILE, Base, adapter_of, load_base, save_release
from .train import Distributed, batch_rng, fit, linear_to_zero, setup_distributed, whole_tensor
from .weights import load_state_dict_strict

MODES = ("lora", "image-head", "full")
# learning rates by what trains (Options.lr overrides): few adapter numbers take large steps, every weight small ones
DEFAULT_LR = {"lora": 1e-3, "image-head": 1e-3, "full": 1e-4}
TRAIN_CHECKPOINT = "train.safetensors"
ANSWERED = 512   # held-out images captioned for the accuracy (the first ones)
# what --resume may differ in: where it runs and how it reports, not what it trains
RESUME_IGNORES = ("out", "resume", "change", "device", "fsdp", "checkpointing", "ckpt_every", "samples",
                  "save_merged", "plan_only")


class UsageError(ValueError):
    """Something the user asked for that cannot run (caught before any step); the script prints it in one line."""


@dataclass
class Options:
    family: str
    base: str
    data: str
    out: str
    vq: str | None = None
    mode: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    task: str = "auto"
    question: str = ""
    p_drop: float | None = None
    steps: int = 200
    batch: int = 8
    lr: float | None = None
    warmup: int = 10
    seed: int = 0
    heldout_fraction: float = 0.1
    caption_column: str = "text"
    class_map: str | None = None
    image_area: int | None = None
    image_size: int | None = None
    gpt_model: str | None = None
    n_head: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    fsdp: bool = False
    checkpointing: bool = False
    ckpt_every: int = 100
    resume: bool = False
    change: list = field(default_factory=list)
    save_merged: bool = False
    samples: int = 8
    plan_only: bool = False


@dataclass
class Job:
    options: Options
    base: Base
    recipe: Recipe
    folder: FolderData
    codes: dict
    run: Distributed
    device: torch.device
    compute_dtype: torch.dtype
    plan: memory.Plan
    out: Path
    log: object = print
    seconds: float = 0.0   # the training stage's wall time


def task_of(options: Options) -> str:
    """auto: the tiny models learn both directions (as train_tiny.py); Emu3 answers when the base is a Chat model
    (its name says so), else draws; LlamaGen and Chameleon draw."""
    if options.task != "auto":
        return options.task
    if options.family == "tiny":
        return "both"
    return "answer" if options.family == "emu3" and "chat" in Path(options.base).name.lower() else "draw"


def class_texts(folder: FolderData, labels, class_map: str | None) -> dict[str, str]:
    """LlamaGen: each class folder's name -> the class its string starts with (an index as text). A mapping file
    (JSON {"folder name": index}) wins; else the name must be an index or an ImageNet class name."""
    mapping = json.loads(Path(class_map).read_text(encoding="utf-8")) if class_map else {}
    out, unknown = {}, []
    for name in sorted({it.text for it in folder.train + folder.heldout}):
        try:
            index = int(mapping[name]) if name in mapping else labels.encode(name)[0] - labels.first_class_id
        except ValueError:
            index = -1
        if 0 <= index < labels.num_classes:
            out[name] = str(index)
        else:
            unknown.append(name)
    if unknown:
        raise UsageError(f"the class(es) {', '.join(map(repr, unknown[:5]))} have no index in this class-to-image "
                         f"model ({labels.num_classes} classes): name the folders by index or ImageNet class name, "
                         f"or give --class-map FILE.json with {{\"folder name\": index}}")
    return out


def check_strings(job_items, recipe: Recipe, context: int) -> int:
    """Every caption must encode with the release's tokenizer and its string fit the model's context, checked from
    the files' sizes before the VQ runs. Returns the longest string's length."""
    longest, broken = 0, []
    for item in job_items:
        try:   # (a byte-level BPE takes any text; a tiny run's word tokenizer refuses words it does not know)
            recipe.tokenizer.encode(item.text)
        except ValueError as e:
            raise UsageError(f"{item.file}: the caption {item.text!r} does not fit the base's tokenizer: {e}")
        try:
            n = recipe.longest(item)
        except (ValueError, OSError) as e:   # not an image, or one the release's processing refuses
            broken.append(f"{item.file} ({str(e).splitlines()[0]})")
            continue
        if n > context:
            raise UsageError(f"{item.file}: its string is {n} tokens ({recipe.task}, caption {item.text[:50]!r}), "
                             f"more than the base model's context of {context}: shorten the caption (or use "
                             f"smaller images)")
        longest = max(longest, n)
    if broken:
        raise FolderError(f"{len(broken)} image(s) cannot be read: {'; '.join(broken[:3])}")
    return longest


def setup_model(gpt, options: Options, start: int, stop: int) -> None:
    """Freeze and wrap (LoRA, head rows) or leave every weight trainable (full), as options.mode says."""
    if options.mode == "lora":
        lora.add_lora(gpt, options.lora, seed=options.seed)
    elif options.mode == "image-head":
        lora.add_row_delta(gpt, start, stop)
    else:
        for p in gpt.parameters():
            p.requires_grad_(True)


def shard(gpt, compute_dtype: torch.dtype) -> None:
    """FSDP2: every decoder block its own unit, then the root (embeddings, final norm, head); parameters gathered
    in the compute dtype, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in gpt.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(gpt, mp_policy=policy)


def prepare(options: Options, log=print) -> Job:
    """Everything that can be refused is refused here, before any step (UsageError, FolderError, MemoryError,
    lora.AdapterMismatch): the flags, the folder, the captions against the tokenizer and context, the classes,
    the memory plan. Then the codes are read from the cache or made."""
    if options.mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    options.lr = options.lr or DEFAULT_LR[options.mode]
    device = torch.device(options.device)
    run, device = setup_distributed(device)
    if options.batch % run.world_size:
        raise UsageError(f"--batch {options.batch} is the global batch: it must split evenly over {run.world_size} "
                         f"ranks")
    if options.fsdp and run.world_size == 1:
        log("note: --fsdp with one process shards nothing; launch with torchrun --nproc_per_node=N")
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    compute_dtype = auto if options.dtype == "auto" else getattr(torch, options.dtype)
    # full fine-tuning keeps fp32 masters (bf16 only in the compute); a frozen base is stored in the compute dtype
    stored = torch.float32 if options.mode == "full" else compute_dtype
    folder = read_folder(options.data, options.heldout_fraction, options.seed, options.caption_column)
    base = load_base(options.family, options.base, options.vq, device=device, dtype=stored,
                     image_size=options.image_size, gpt_model=options.gpt_model, n_head=options.n_head)
    pipe = base.pipe
    task = task_of(options)
    # a tiny run trained with its own loss weights and caption drop (its sequence_options); releases: 1, 1, 0.1
    trained = read_meta(base.path / "gpt.safetensors").get("sequence_options", {}) if base.family == "tiny" else {}
    p_drop = options.p_drop if options.p_drop is not None else (
        0.0 if task == "answer" else trained.get("p_drop_caption", 0.1))
    if base.family == "llamagen":
        if folder.convention != "class folders":
            raise UsageError(f"{options.data} is a captioned folder; a class-to-image model (LlamaGen) trains on "
                             f"class folders (FOLDER/<class>/*.png)")
        texts = class_texts(folder, pipe.tokenizer, options.class_map)
        folder = FolderData(folder.convention, *[[it._replace(text=texts[it.text]) for it in part]
                                                 for part in (folder.train, folder.heldout)])
    if options.mode == "lora" and base.family == "llamagen" and \
            len({"q_proj", "k_proj", "v_proj"} & set(options.lora.targets)) not in (0, 3):
        raise UsageError("LlamaGen fuses q, k and v into one wqkv: LoRA targets all three of q_proj, k_proj, "
                         "v_proj or none")
    recipe = Recipe(pipe, base.family, task, options.question, p_drop, options.image_area,
                    trained.get("visual_weight", 1.0), trained.get("answer_weight", 1.0))
    longest = check_strings(folder.train + folder.heldout, recipe, pipe.gpt.config.max_seq_len)
    out = Path(options.out)
    if options.resume:
        if run.main:
            log(check_resume(out, settings_of(options_settings(options)), names=(TRAIN_CHECKPOINT,),
                             ignore=RESUME_IGNORES, allowed=options.change,
                             hint="to change a flag on purpose, add --change FLAG"))
    elif (out / TRAIN_CHECKPOINT).exists():
        raise UsageError(f"{out} already holds {TRAIN_CHECKPOINT}: pass --resume to continue that run, or another "
                         f"--out")

    gpt = pipe.gpt
    setup_model(gpt, options, pipe.layout.first_visual, pipe.layout.first_visual + pipe.layout.codebook_size)
    per_rank = options.batch // run.world_size
    loss_positions = per_rank * (longest if task != "answer" else 64)   # answers: a generous caption length
    plan = memory.plan(gpt, per_rank, longest, loss_positions, compute_dtype, run.world_size, options.fsdp,
                       options.checkpointing)
    if run.main:
        log(plan.table())
        log(memory.check_fits(plan, free_memory(device), device))
    if options.plan_only:
        return Job(options, base, recipe, folder, {}, run, device, compute_dtype, plan, out, log)
    for turn in range(2 if run.world_size > 1 else 1):   # the main rank fills the cache, then the others read it
        if run.world_size > 1:
            dist.barrier()
        if (turn == 0) == run.main:
            codes = tokenize(folder.train + folder.heldout, recipe, pipe.vq, out / "codes.safetensors",
                             log=log if run.main else lambda *a: None)
    if options.fsdp and run.world_size > 1:
        shard(gpt, compute_dtype)
    return Job(options, base, recipe, folder, codes, run, device, compute_dtype, plan, out, log)


def options_settings(options: Options) -> dict:
    """The options as JSON values (the LoRA config a dict, tuples lists), as checkpoints store settings."""
    return json.loads(json.dumps(asdict(options), default=str))


def train(job: Job) -> list:
    """The stage: one train.fit, loss_fn below. Returns fit's history (the global loss per logged step)."""
    options, run, recipe, gpt = job.options, job.run, job.recipe, job.base.pipe.gpt
    items, world = job.folder.train, run.world_size
    per_rank = options.batch // world
    autocast = torch.autocast(job.device.type, job.compute_dtype) if (
        options.mode == "full" and not options.fsdp and job.compute_dtype != torch.float32) else nullcontext()

    def loss_fn(net, step):
        rng = batch_rng(options.seed, 0, step)   # every rank draws the global batch, then takes its slice
        pick = rng.integers(len(items), size=options.batch)
        rows = [recipe.string(items[i].text, job.codes[items[i].key], rng) for i in pick]
        ids, targets, weights = batch(rows, recipe.pad)
        total = weights.sum()
        mine = slice(run.rank * per_rank, (run.rank + 1) * per_rank)
        ids, targets, weights = (t[mine].to(job.device) for t in (ids, targets, weights))
        select = weights > 0
        with autocast:
            logits = net(ids, select=select, checkpoint_layers=options.checkpointing)      # (N, V)
        nll = F.cross_entropy(logits.float(), targets[select], reduction="none")
        loss = (nll * weights[select]).sum() / total * world
        shown = loss.detach() / world
        if world > 1:
            dist.all_reduce(shown)
        return loss, {"loss": shown}

    gpt.train()
    meta = {"kind": "finetune", "base": job.base.name, "family": job.base.family, "mode": options.mode,
            SETTINGS_KEY: settings_of(options_settings(options))}
    start = time.time()
    history = fit(gpt, loss_fn, options.steps, options.lr, job.out / TRAIN_CHECKPOINT, meta, run,
                  ckpt_every=options.ckpt_every, resume=options.resume, warmup=options.warmup,
                  schedule=linear_to_zero, trainable_only=options.mode != "full", desc="finetune")
    job.seconds = time.time() - start
    return history


def finish(job: Job, history: list) -> dict | None:
    """After the last step: the adapter (LoRA) and the merged model in the released layout (always for full and
    image-head, with save_merged for LoRA), then, on the main rank, the evaluation: held-out NLL, caption
    accuracy where the task answers, the loss plot and a sample grid through the Pipeline."""
    options, base, run, gpt = job.options, job.base, job.run, job.base.pipe.gpt
    state = {k: whole_tensor(v).cpu() for k, v in gpt.state_dict().items()}   # gathered on every rank (FSDP)
    gpt.to("meta")   # the training copy's memory is free for the evaluation's (the modules still name the deltas)
    if not run.main:
        return None
    settings = {"base": {"family": base.family, "name": base.name, "layout": base.layout,
                         "fingerprint": base.fingerprint, "vq": str(base.vq_path) if base.vq_path else None},
                "data": options.data, "task": job.recipe.task, "options": options_settings(options),
                "steps": options.steps, "final_loss": history[-1]["loss"] if history else None}
    if options.mode == "lora":
        lora.save_adapter(adapter_of(base, gpt, options.lora, state), job.out / "adapter")
        (job.out / "adapter" / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str))
        job.log(f"wrote {job.out / 'adapter'} (peft's format)")
    merged = lora.merged_state(gpt, state)
    if options.mode != "lora" or options.save_merged:
        save_release(base, merged, job.out / "model", settings)
        job.log(f"wrote {job.out / 'model'} ({base.family}, {base.layout} layout)")
    eval_gpt = plain_gpt(gpt, merged, job.device, job.compute_dtype if options.mode != "full" else torch.float32)
    pipe = base.pipe
    pipe.gpt = eval_gpt.eval()
    metrics = measure(job, pipe)
    metrics.update(train_s=round(job.seconds, 1), steps=options.steps,
                   first_loss=history[0]["loss"] if history else None, final_loss=settings["final_loss"])
    evaluate.plot_losses({"finetune": history}, job.out / "loss.png", {"finetune": "loss"})
    (job.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def plain_gpt(gpt, merged: dict, device, dtype) -> GPT:
    """A plain GPT (no adapters, not sharded) holding the merged weights, for sampling and evaluation."""
    with torch.device("meta"):
        plain = GPT(gpt.config)
    load_state_dict_strict(plain, {k: v.to(device, dtype) for k, v in merged.items()}, "the merged weights",
                           assign=True)
    return plain


@torch.no_grad()
def heldout_nll(job: Job, pipe, items, task: str, batch_size: int = 8) -> float:
    """Teacher-forced NLL of the held-out strings, nats per learned token (draw: the image block's codes only,
    as evaluate.image_nll; answer: the answer and its EOS)."""
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        ids, targets, weights = batch([job.recipe.string(it.text, job.codes[it.key], task=task) for it in part],
                                      job.recipe.pad)
        select = weights > 0
        if task == "draw":
            select &= pipe.layout.is_visual(targets)
        logits = pipe.gpt(ids.to(job.device), select=select.to(job.device))
        total += F.cross_entropy(logits.float(), targets[select].to(job.device), reduction="sum").item()
        count += int(select.sum())
    return total / max(count, 1)


def measure(job: Job, pipe) -> dict:
    recipe, items, out = job.recipe, job.folder.heldout, job.out
    tasks = ["draw", "answer"] if recipe.task == "both" else [recipe.task]
    metrics = {f"nll_heldout_{task}": round(heldout_nll(job, pipe, items, task), 4) for task in tasks}
    texts = sorted({it.text for it in items}) or sorted({it.text for it in job.folder.train})
    if "answer" in tasks:
        from .folder import load_square
        side = recipe.side
        items = items[:ANSWERED]
        images = [np.asarray(load_square(it.file, side)) if job.base.family == "tiny" else it.file for it in items]
        said = [text for start in range(0, len(images), 32)
                for text in pipe.answer(images[start:start + 32], recipe.question, max_new_tokens=48)]
        right = [s.strip() == it.text for s, it in zip(said, items)]
        metrics["caption_accuracy_heldout"] = round(float(np.mean(right)), 4) if right else None
        if job.options.samples and job.base.family == "tiny" and items:   # spread over the (sorted) folder
            shown = np.linspace(0, len(items) - 1, min(len(items), max(job.options.samples, 4))).astype(int)
            evaluate.captioned_grid(np.stack([images[i] for i in shown]), [said[i] for i in shown],
                                    [right[i] for i in shown], out / "captions.png",
                                    title="held-out images, captioned by the fine-tuned model")
    if "draw" in tasks and job.options.samples and pipe.vq.decoder is None:
        job.log("no samples.png: this release's VQ has no decoder (Chameleon's -hf conversion drops it; Anole's "
                "keeps it)")
    elif "draw" in tasks and job.options.samples:
        prompts = texts[:max(1, job.options.samples // 2)]
        drawn = pipe.draw([p for p in prompts for _ in range(2)], seed=job.options.seed)
        labels = prompts if job.base.family != "llamagen" else [
            pipe.tokenizer.decode(pipe.tokenizer.encode(p)) for p in prompts]
        evaluate.image_grid(np.stack([np.asarray(im) for im in drawn]), labels, out / "samples.png", columns=2,
                            title="drawn by the fine-tuned model")
    return metrics
