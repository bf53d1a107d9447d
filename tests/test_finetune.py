"""finetune.py on a tiny random run treated as the "release" (tests/tiny_run.py) and a generated class folder: the
loss falls, the adapter and the merged model load where a user loads them and give the fine-tuned model's logits,
a killed run resumes to the same weights, the codes cache re-tokenizes only what changed, and bad input is one
line and exit 2 before any step. (The released families: tests/test_finetune_release.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import sample
from nano_emu import finetune as stage
from nano_emu.checkpoint import load_checkpoint
from nano_emu.lora import AdapterMismatch
from nano_emu.release import apply_adapter
from nano_emu.tiny import load_tiny
from tiny_run import write_run

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}


def write_folder(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Class folders of 64x64 squares, one colour per class (words the tiny vocabulary knows)."""
    rng = np.random.default_rng(seed)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.zeros((64, 64, 3), np.uint8)
            x, y = rng.integers(0, 40, size=2)
            pixels[y:y + 24, x:x + 24] = color
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("colors"))


def args(base, folder, out, *more):
    return finetune.parse_args(["--ckpt", str(base), "--data", str(folder), "--out", str(out), "--device", "cpu",
                                "--steps", "12", "--batch", "4", "--warmup", "2", "--samples", "2", *more])


def run(base, folder, out, *more):
    torch.set_num_threads(1)
    return finetune.main(args(base, folder, out, *more))


def logits(gpt, seed=0):
    ids = torch.randint(0, gpt.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gpt(ids)


def test_lora_finetune_learns_and_its_adapter_and_merged_model_load(base, folder, tmp_path):
    out = tmp_path / "run"
    job = stage.prepare(finetune.options_of(args(base, folder, out, "--lr", "1e-2", "--save-merged")))
    history = stage.train(job)
    metrics = stage.finish(job, history)
    assert metrics["final_loss"] < metrics["first_loss"] - 0.3       # the loss falls
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/gpt.safetensors",
                 "model/vq.safetensors", "model/finetune.json", "loss.png", "metrics.json", "samples.png",
                 "captions.png", "codes.safetensors", "train.safetensors"):
        assert (out / name).is_file(), name
    finetuned = job.base.pipe.gpt   # the fine-tuned model the run evaluated (adapters merged)
    saved = json.loads((out / "model" / "finetune.json").read_text())
    assert saved["base"]["family"] == "tiny" and saved["options"]["lora"]["rank"] == 8

    merged = load_tiny(out / "model")                                # the released layout, as sample.py --ckpt
    torch.testing.assert_close(logits(merged.gpt), logits(finetuned), atol=1e-5, rtol=1e-5)
    adapted = load_tiny(base)                                        # the base + the adapter, as sample.py --adapter
    apply_adapter(adapted, "tiny", base, out / "adapter")
    torch.testing.assert_close(logits(adapted.gpt), logits(finetuned), atol=1e-5, rtol=1e-5)
    # only the adapters were checkpointed for resume, not the base under them
    state, meta, _ = load_checkpoint(out / "train.safetensors")
    assert state and all("lora_" in k for k in state) and meta["step"] == 12


def test_sample_py_takes_the_adapter_and_refuses_it_on_another_base(base, folder, tmp_path, capsys):
    out = tmp_path / "run"
    run(base, folder, out, "--steps", "2")
    sample.main(sample.parse_args(["--ckpt", str(base), "--adapter", str(out / "adapter"), "--prompt", "red",
                                   "--device", "cpu", "--out", str(tmp_path / "red.png")]))
    assert Image.open(tmp_path / "red.png").size == (64, 64)
    other = write_run(tmp_path / "other", seed=1)    # the same shapes, other weights
    with pytest.raises(AdapterMismatch, match=r"was trained on another base model .* fingerprint"):
        sample.main(sample.parse_args(["--ckpt", str(other), "--adapter", str(out / "adapter"), "--prompt", "red",
                                       "--device", "cpu", "--out", str(tmp_path / "x.png")]))


def test_full_finetune_saves_the_tiny_release(base, folder, tmp_path):
    out = tmp_path / "run"
    job = stage.prepare(finetune.options_of(args(base, folder, out, "--full")))
    stage.finish(job, stage.train(job))
    reloaded = load_tiny(out / "model")   # the VQ is the base's: check_same_vq accepts the pair
    torch.testing.assert_close(logits(reloaded.gpt), logits(job.base.pipe.gpt), atol=1e-6, rtol=1e-6)
    assert not logits(reloaded.gpt).equal(logits(load_tiny(base).gpt))
    assert not (out / "adapter").exists()


def test_a_killed_run_resumes_to_the_same_adapters(base, folder, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(base, folder, reference, "--ckpt-every", "4", "--samples", "0")
    killed = tmp_path / "killed"
    calls = {"n": 0}
    real_batch = stage.batch

    def batch_then_die(rows, pad):   # as kill -9 at step 6: the last checkpoint is step 4's
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return real_batch(rows, pad)

    monkeypatch.setattr(stage, "batch", batch_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run(base, folder, killed, "--ckpt-every", "4", "--samples", "0")
    monkeypatch.setattr(stage, "batch", real_batch)
    assert load_checkpoint(killed / "train.safetensors")[1]["step"] == 4
    run(base, folder, killed, "--ckpt-every", "4", "--samples", "0", "--resume")
    a, meta_a, _ = load_checkpoint(reference / "train.safetensors")
    b, meta_b, _ = load_checkpoint(killed / "train.safetensors")
    assert meta_a["history"] == meta_b["history"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_codes_cache_retokenizes_only_what_changed(base, tmp_path, capsys):
    folder = write_folder(tmp_path / "colors", per_class=4)
    run(base, folder, tmp_path / "a", "--steps", "1", "--samples", "0")
    assert "tokenizing 12 image(s) with the release's VQ (0 cached)" in capsys.readouterr().out
    first = sorted((folder / "red").glob("*.png"))[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[:4] = 255
    Image.fromarray(pixels).save(first)
    (tmp_path / "a" / "train.safetensors").unlink()   # a fresh run in the same folder, on the changed data
    run(base, folder, tmp_path / "a", "--steps", "1", "--samples", "0")
    assert "tokenizing 1 image(s) with the release's VQ (11 cached)" in capsys.readouterr().out
    run(base, folder, tmp_path / "a", "--steps", "1", "--samples", "0", "--resume", "--change", "steps")
    assert "tokenizing" not in capsys.readouterr().out
    (tmp_path / "a" / "codes.safetensors").write_bytes(b"torn")   # a cache it cannot read is derived data: rebuilt
    (tmp_path / "a" / "train.safetensors").unlink()
    run(base, folder, tmp_path / "a", "--steps", "1", "--samples", "0")
    out = capsys.readouterr().out
    assert "cannot be read" in out and "tokenizing 12 image(s) with the release's VQ (0 cached)" in out


def finetune_cli(*argv):
    """finetune.py in a subprocess: (exit code, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return done.returncode, done.stderr


def test_bad_input_is_one_line_and_exit_2_before_any_step(base, folder, tmp_path):
    common = ["--ckpt", str(base), "--out", str(tmp_path / "out"), "--device", "cpu"]
    code, err = finetune_cli(*common, "--data", str(folder), "--rank", "0")
    assert code == 2 and err.count("\n") == 1 and "rank 0 would train nothing" in err
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    Image.new("RGB", (64, 64)).save(captioned / "a.png")
    Image.new("RGB", (64, 64)).save(captioned / "b.png")
    (captioned / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n'
                                              '{"file_name": "b.png", "text": "a purple elephant"}\n')
    code, err = finetune_cli(*common, "--data", str(captioned))
    assert code == 2 and err.count("\n") == 1, err
    assert "b.png: the caption 'a purple elephant' does not fit the base's tokenizer" in err
    assert not (tmp_path / "out" / "train.safetensors").exists()


def test_too_long_captions_and_memory_are_refused(base, folder, tmp_path, monkeypatch):
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(captioned / f"{name}.png")
    long = " ".join(["red"] * 600)
    (captioned / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n" +
                                              json.dumps({"file_name": "b.png", "text": long}) + "\n")
    with pytest.raises(stage.UsageError, match=r"b.png: its string is \d+ tokens .* more than the base model's "
                                               r"context of 512"):
        run(base, captioned, tmp_path / "out")
    monkeypatch.setattr(stage, "free_memory", lambda device: 2 * 2**20)
    with pytest.raises(MemoryError, match=r"the memory plan needs .* MiB per rank, and 2.0 MiB of RAM is free"):
        run(base, folder, tmp_path / "out")
    assert not (tmp_path / "out" / "codes.safetensors").exists()   # refused before the VQ ran


def test_plan_only_prints_the_plan_and_trains_nothing(base, folder, tmp_path, capsys):
    plan = run(base, folder, tmp_path / "out", "--plan-only", "--full")
    printed = capsys.readouterr().out
    assert "memory plan per rank (1 rank):" in printed and "optimizer state (AdamW, fp32)" in printed
    assert plan.optimizer == 2 * plan.grads > 0 and not (tmp_path / "out" / "codes.safetensors").exists()


def test_unreadable_images_are_refused_by_name(base, tmp_path):
    folder = write_folder(tmp_path / "colors", per_class=3)
    (folder / "red" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(stage.FolderError, match=r"1 image\(s\) cannot be read: .*broken.png"):
        run(base, folder, tmp_path / "out")
