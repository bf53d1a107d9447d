"""The guards around a run's checkpoints: the VQ a GPT was trained on, one run per output folder, --resume with the
settings the run was trained with, and metadata that is not what it should be."""

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nano_emu.checkpoint import (LOCK_NAME, SETTINGS_KEY, VQ_HASH_KEY, FolderInUse, check_resume, check_same_vq,
                                 load_checkpoint, load_extra, output_lock, read_meta, save_checkpoint, settings_of,
                                 weights_hash)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ metadata


def test_extra_tensors_and_metadata_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    model = {"w": torch.randn(3, 2)}
    counts = torch.arange(5.0)
    save_checkpoint(path, model, {"kind": "vq", "step": 3}, extra={"code_counts": counts})
    state, meta, optimizer = load_checkpoint(path)
    assert torch.equal(state["w"], model["w"]) and optimizer is None and set(state) == {"w"}
    assert meta == {"kind": "vq", "step": 3} == read_meta(path)
    assert torch.equal(load_extra(path)["code_counts"], counts)
    save_checkpoint(path, model, {})
    assert load_extra(path) == {}


@pytest.mark.parametrize("header, says", [("{not json", "not valid JSON"), ("[1, 2]", "is a JSON list"),
                                          (None, "has no nano_emu metadata")])
def test_broken_metadata_names_the_file(tmp_path, header, says):
    path = tmp_path / "gpt.safetensors"
    save_file({"model.w": torch.zeros(2)}, str(path), metadata=None if header is None else {"nano_emu": header})
    for read in (load_checkpoint, read_meta):   # before: json.JSONDecodeError, without the file's name
        with pytest.raises(ValueError, match=says) as error:
            read(path)
        assert str(path) in str(error.value)


def test_metadata_without_an_optimizer_entry_loads(tmp_path):
    path = tmp_path / "x.safetensors"   # a file written by hand: before, load_checkpoint's pop raised KeyError
    save_file({"model.w": torch.ones(2)}, str(path), metadata={"nano_emu": '{"kind": "vq"}'})
    state, meta, optimizer = load_checkpoint(path)
    assert meta == {"kind": "vq"} and optimizer is None and torch.equal(state["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------------ VQ hash


def test_weights_hash_is_the_weights_and_only_them():
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(3), "n": torch.tensor(7)}
    digest = weights_hash(state)
    assert digest == weights_hash({k: v.clone() for k, v in reversed(state.items())})   # order and copies
    assert digest == weights_hash({k: v.t().contiguous().t() for k, v in state.items()})   # memory layout
    flipped = state["a.weight"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1   # one bit
    assert weights_hash({**state, "a.weight": flipped}) != digest
    assert weights_hash({"c.weight" if k == "a.weight" else k: v for k, v in state.items()}) != digest
    assert weights_hash({**state, "n": torch.tensor(7.0)}) != digest   # the dtype counts
    assert weights_hash({"x": torch.randn(3, dtype=torch.bfloat16)})   # no numpy dtype for bfloat16: still hashed


def test_check_same_vq(tmp_path):
    ours, theirs = "a" * 64, "b" * 64
    assert check_same_vq({VQ_HASH_KEY: ours}, ours, "run/gpt.safetensors", "run/vq.safetensors") is None
    with pytest.raises(ValueError, match=r"run/gpt.safetensors was trained on another VQ than other/vq.safetensors "
                                         r"\(VQ weights aaaaaaaaaaaa there, bbbbbbbbbbbb here\)"):
        check_same_vq({VQ_HASH_KEY: ours}, theirs, "run/gpt.safetensors", "other/vq.safetensors")
    note = check_same_vq({}, theirs, "old/gpt.safetensors", "old/vq.safetensors")
    assert note.startswith("note: old/gpt.safetensors predates the record of its VQ")


# ------------------------------------------------------------------------------------------------ the lock


HOLD = ("import sys, time; from nano_emu.checkpoint import output_lock; lock = output_lock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def hold_in_another_process(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(FolderInUse, match=rf"{folder} is in use by another training run \(pid {holder.pid},"):
            output_lock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_and_tmp_files_are_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    (folder / "gpt.safetensors.tmp").write_bytes(b"half a checkpoint")   # a write the holder never finished
    holder.send_signal(signal.SIGKILL)   # kill -9: no cleanup runs
    holder.wait()
    assert (folder / LOCK_NAME).read_text().strip() == str(holder.pid)   # the file stays behind, naming a dead pid
    with output_lock(folder):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert not (folder / "gpt.safetensors.tmp").exists()
        assert "removed" in capsys.readouterr().out
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):   # another open of it in this process too
            output_lock(folder).acquire()
    assert not (folder / LOCK_NAME).exists()   # released: the file is gone
    with output_lock(folder):                  # and free again
        pass


def test_the_lock_goes_with_the_holder_however_it_ends(tmp_path):
    folder = tmp_path / "run"
    for ending in (signal.SIGTERM, signal.SIGKILL):
        holder = hold_in_another_process(folder)
        holder.send_signal(ending)
        holder.wait()
        deadline = time.time() + 10
        while True:   # the kernel drops the flock as the process ends; nothing waits for a timeout
            try:
                output_lock(folder).acquire().release()
                break
            except FolderInUse:
                assert time.time() < deadline
                time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ --resume


def run_folder(tmp_path, **settings):
    folder = tmp_path / "run"
    stored = settings_of(Namespace(out=folder, video=False, gpt_steps=40, gpt_lr=3e-3, device="cpu", **settings))
    for name in ("vq.safetensors", "gpt.safetensors"):
        save_checkpoint(folder / name, {"w": torch.zeros(1)}, {"kind": name[:-12], SETTINGS_KEY: stored})
    return folder, stored


def test_resume_with_the_same_settings(tmp_path):
    folder, stored = run_folder(tmp_path)
    assert check_resume(folder, stored) == f"resuming the run in {folder} (vq.safetensors, gpt.safetensors)"
    assert check_resume(folder, {**stored, "out": "moved/run", "device": "cuda"}, ignore={"out", "device"})


def test_resume_with_other_settings_names_every_flag(tmp_path):
    folder, stored = run_folder(tmp_path)
    with pytest.raises(ValueError) as error:
        check_resume(folder, {**stored, "video": True, "gpt_lr": 1e-3}, ignore={"out"}, hint="or pass --change")
    message = str(error.value)
    assert message.startswith(f"--resume asks for other settings than the run in {folder} was trained with: ")
    assert "--gpt-lr 0.003 there, 0.001 now; --video off there, on now." in message   # once, not once per file
    assert message.endswith("or pass --change")
    # a change allowed on purpose goes through, and is said
    note = check_resume(folder, {**stored, "gpt_steps": 80}, ignore={"out"}, allowed={"gpt_steps"})
    assert "gpt.safetensors: --gpt-steps 40 there, 80 now (allowed)" in note
    with pytest.raises(ValueError, match="no flag --gpt-stpes to allow a change of"):   # a typo is not "allowed"
        check_resume(folder, stored, allowed={"gpt_stpes"})


def test_resume_on_an_empty_folder_says_it_starts_fresh(tmp_path):
    assert check_resume(tmp_path, {"video": False}) == (
        f"--resume: {tmp_path} holds no checkpoint yet (vq.safetensors, gpt.safetensors), so the run starts fresh")


def test_resume_of_a_run_from_before_stored_settings(tmp_path):
    save_checkpoint(tmp_path / "vq.safetensors", {"w": torch.zeros(1)}, {"kind": "vq"})
    note = check_resume(tmp_path, {"video": True})
    assert "vq.safetensors predates stored settings" in note
