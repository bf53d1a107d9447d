"""finetune.py past one process: `torchrun --nproc_per_node=2 ... --fsdp` (FSDP2's fully_shard per block then the
root, on gloo: it runs on a CPU in torch 2.13) takes the steps one process takes with the same global batch, to
float tolerance: the same logged losses, the same weights. With activation checkpointing on top, and across a
resume that changes the number of processes (the checkpoints hold whole tensors). About 25 s on 2 cores."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from nano_emu import finetune as stage
from nano_emu.checkpoint import load_checkpoint
from test_finetune import write_folder
from tiny_run import write_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent /
                                                                          "torchrun").is_file(),
                                reason="needs torchrun (PyTorch's launcher)")


@pytest.fixture(scope="module")
def base_and_folder(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("base")), write_folder(tmp_path_factory.mktemp("colors"), per_class=4)


def flags(base, folder, out, *more):
    return ["--ckpt", str(base), "--data", str(folder), "--out", str(out), "--device", "cpu", "--steps", "4",
            "--batch", "4", "--warmup", "1", "--samples", "0", "--ckpt-every", "2", *more]


def one_process(base, folder, out, *more):
    torch.set_num_threads(1)
    return finetune.main(finetune.parse_args(flags(base, folder, out, *more)))


def two_ranks(base, folder, out, *more):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", str(ROOT / "finetune.py"),
                           *flags(base, folder, out, "--fsdp", *more)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def same_run(a: Path, b: Path, atol=1e-6):
    state_a, meta_a, opt_a = load_checkpoint(a / "train.safetensors")
    state_b, meta_b, opt_b = load_checkpoint(b / "train.safetensors")
    assert [h["step"] for h in meta_a["history"]] == [h["step"] for h in meta_b["history"]]
    for x, y in zip(meta_a["history"], meta_b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], atol=atol, rtol=1e-5, msg=key)
    for index in opt_a["state"]:
        torch.testing.assert_close(opt_a["state"][index]["exp_avg"], opt_b["state"][index]["exp_avg"], atol=atol,
                                   rtol=1e-5)


def test_fsdp_lora_with_checkpointing_takes_the_one_process_steps(base_and_folder, tmp_path):
    base, folder = base_and_folder
    one_process(base, folder, tmp_path / "one")
    two_ranks(base, folder, tmp_path / "two", "--checkpointing")
    same_run(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_finetune_resumes_under_fsdp_from_a_one_process_checkpoint(base_and_folder, tmp_path, monkeypatch):
    base, folder = base_and_folder
    one_process(base, folder, tmp_path / "straight", "--full")
    calls, real_batch = {"n": 0}, stage.batch

    def batch_then_die(rows, pad):   # killed in step 3: the checkpoint of step 2 is what is left
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real_batch(rows, pad)

    monkeypatch.setattr(stage, "batch", batch_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        one_process(base, folder, tmp_path / "resumed", "--full")
    monkeypatch.setattr(stage, "batch", real_batch)
    assert load_checkpoint(tmp_path / "resumed" / "train.safetensors")[1]["step"] == 2
    two_ranks(base, folder, tmp_path / "resumed", "--full", "--resume")   # whole tensors, sharded back over 2 ranks
    same_run(tmp_path / "straight", tmp_path / "resumed")
