"""nano_emu/train.py: a VQ stage killed and resumed trains exactly the weights of one that ran through; and what
guards train_tiny.py's --out folder: one run at a time, --resume only with the run's settings and its VQ."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_tiny
from nano_emu import recipe
from nano_emu import shapes
from nano_emu.checkpoint import LOCK_NAME, SETTINGS_KEY, RunMismatch, load_checkpoint, settings_of
from nano_emu.image import to_tensor
from nano_emu.train import Distributed, batch_rng, fit, init_vq_for_training, train_vq
from nano_emu.vq import VQConfig, VQModel
from tiny_run import write_run

ROOT = Path(__file__).resolve().parents[1]


def vq_stage(ckpt, steps=40, resume=False, crash_at=None, restart_every=20):
    """train_tiny.py --quick's VQ stage (its config, batch, learning rate and data), with --ckpt-every 5."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny(temporal_factor=1, embed_dim=4))
    init_vq_for_training(vq)

    def sample_images(step):
        if step == crash_at:   # as kill -9: nothing is saved, the run restarts from the last checkpoint
            raise RuntimeError("killed")
        return to_tensor(shapes.sample_shapes(4, batch_rng(0, 0, step))[0])

    history = train_vq(vq, sample_images, steps, 1e-3, ckpt, {"kind": "vq"}, Distributed(), resume=resume,
                       ckpt_every=5, restart_every=restart_every)
    return vq, history


@pytest.mark.parametrize("restart_every", [20, 5])   # 20: --quick's restarts (step 19); 5: restarts before the kill too
def test_a_killed_vq_stage_resumes_to_the_same_weights(tmp_path, restart_every):
    """Before: the code-usage counters that decide which codes restart lived outside the checkpoint, so a resumed
    run restarted other codes (kill at step 12 of --quick: PSNR 14.34 against 14.35); and the restarts drew from
    the global torch RNG, whose state a resumed run did not have."""
    torch.set_num_threads(1)
    reference, reference_history = vq_stage(tmp_path / "ref.safetensors", restart_every=restart_every)
    ckpt = tmp_path / "vq.safetensors"
    with pytest.raises(RuntimeError, match="killed"):
        vq_stage(ckpt, crash_at=12, restart_every=restart_every)
    assert load_checkpoint(ckpt)[1]["step"] == 10
    resumed, history = vq_stage(ckpt, resume=True, restart_every=restart_every)
    assert history == reference_history   # the logged losses and codebook usage, step for step
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="torch.compile on a CPU writes C++")
def test_a_compiled_gpt_stage_trains_as_eager_and_saves_the_models_keys(tmp_path):
    """train_tiny.py --compile: the GPT stage runs compiled (dynamic shapes: the strings change length), its
    checkpoint holds the GPT's own names (not torch.compile's wrapper's) and its losses follow the eager run's."""
    from nano_emu.gpt import GPT, GPTConfig
    from nano_emu.layout import Layout
    from nano_emu.tokenizer import ByteTokenizer
    from nano_emu.train import Pool, train_gpt

    layout = Layout.tiny(64, text_vocab=ByteTokenizer().n_vocab)
    codes = torch.randint(64, (16, 2, 2))
    captions = [("a red circle", "two blue squares", "a cat")[i % 3] for i in range(16)]
    pools = [Pool(codes, captions, [[("", c), ("what?", "yes")] for c in captions])]
    histories, states = [], []
    for compile in (False, True):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig.tiny(layout.vocab_size, dim=32, n_layer=1, intermediate_size=64))
        ckpt = tmp_path / f"gpt_{compile}.safetensors"
        histories.append(train_gpt(gpt, layout, ByteTokenizer(), pools, 6, 4, 1e-3, ckpt, {"kind": "gpt"},
                                   Distributed(), compile=compile, log_every=1))
        states.append(load_checkpoint(ckpt)[0])
    assert set(states[1]) == set(GPT(GPTConfig.tiny(layout.vocab_size, dim=32, n_layer=1,
                                                    intermediate_size=64)).state_dict())
    eager, compiled = ([h["loss"] for h in history] for history in histories)
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-3)


BAD_BATCH = """
import torch
from pathlib import Path
from nano_emu.train import Distributed, fit
def loss_fn(net, step):
    if step == 3:
        raise ValueError("bad batch")
    return net(torch.ones(1, 2)).sum(), {{}}
fit(torch.nn.Linear(2, 1), loss_fn, 10, 0.1, Path(r"{ckpt}"), {{}}, Distributed())
"""


def test_an_error_is_not_printed_on_the_progress_bars_line(tmp_path):
    """Before: the bar was left open, so Python's traceback began on its line ('...it/s]Traceback ...')."""
    result = subprocess.run([sys.executable, "-c", BAD_BATCH.format(ckpt=tmp_path / "x.safetensors")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "ValueError: bad batch" in result.stderr
    assert "\nTraceback (most recent call last)" in result.stderr, result.stderr[:300]


# ------------------------------------------------------------------------------------ train_tiny.py's --out folder


def quick_args(out, *flags):
    return train_tiny.parse_args(["--quick", "--out", str(out), "--device", "cpu", *flags])


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    """Before: both ran, and the folder ended up with one run's VQ next to the other's GPT."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), "--quick", "--out", str(out), "--device",
                              "cpu"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not ((out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(ROOT / "train_tiny.py"), "--quick", "--out", str(out),
                                 "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"train_tiny.py: error: {out} is in use by another training run (pid {first.pid},")


def settled_run(folder, *flags):
    """A finished run's folder as train_tiny.py --quick writes it (random weights; the settings it stores)."""
    args = recipe.fill_from_preset(quick_args(folder, *flags))
    args.out = Path(args.out)
    write_run(folder, vq_meta={SETTINGS_KEY: settings_of(args)}, gpt_meta={SETTINGS_KEY: settings_of(args)})
    return folder


def test_resume_with_other_settings_is_refused_before_training(tmp_path, monkeypatch):
    """Before: --resume --video on a finished image run retrained over it (and failed on 52 mismatched keys)."""
    out = settled_run(tmp_path / "run")
    monkeypatch.setattr(recipe, "vq_stage", lambda *a: pytest.fail("trained"))
    with pytest.raises(RunMismatch, match=r"--video off there, on now.*add --change FLAG") as error:
        train_tiny.main(quick_args(out, "--resume", "--video"))
    assert "--vq-width 4 there, 8 now" in str(error.value)   # what --video changes in the preset, named too
    with pytest.raises(RunMismatch, match="--gpt-steps 40 there, 80 now"):
        train_tiny.main(quick_args(out, "--resume", "--gpt-steps", "80"))
    monkeypatch.setattr(recipe, "vq_stage", lambda *a: (_ for _ in ()).throw(RuntimeError("trains")))
    with pytest.raises(RuntimeError, match="trains"):   # a change asked for on purpose goes through
        train_tiny.main(quick_args(out, "--resume", "--gpt-steps", "80", "--change", "gpt-steps"))
    assert not (out / LOCK_NAME).exists()   # released on the way out


def test_resume_on_an_empty_folder_says_it_starts_fresh(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "vq_stage", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        train_tiny.main(quick_args(tmp_path / "new", "--resume"))
    assert "holds no checkpoint yet (vq.safetensors, gpt.safetensors), so the run starts fresh" in capsys.readouterr().out


def test_the_gpt_is_not_resumed_on_another_vq(tmp_path):
    """A GPT stage checkpoint beside a VQ it was not trained on (another run's, or one trained on with more
    steps): refused by name before a step is taken. Before: it trained on, reading the new codes as the old."""
    out = settled_run(tmp_path / "run")
    other = settled_run(tmp_path / "other")
    shutil.copy(write_run(tmp_path / "seed1", seed=1) / "vq.safetensors", other)   # another VQ, same settings
    shutil.copy(other / "vq.safetensors", out)
    with pytest.raises(RunMismatch, match=r"gpt.safetensors was trained on another VQ than .*vq.safetensors"):
        train_tiny.main(quick_args(out, "--resume"))
