"""nano_emu/train.py: a VQ stage killed and resumed trains exactly the weights of one that ran through."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nano_emu import data
from nano_emu.checkpoint import load_checkpoint
from nano_emu.train import Distributed, batch_rng, fit, init_vq_for_training, train_vq
from nano_emu.vq import VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[1]


def vq_stage(ckpt, steps=40, resume=False, crash_at=None, restart_every=20):
    """train_tiny.py --quick's VQ stage (its config, batch, learning rate and data), with --ckpt-every 5."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny(temporal_factor=1, embed_dim=4))
    init_vq_for_training(vq)

    def sample_images(step):
        if step == crash_at:   # as kill -9: nothing is saved, the run restarts from the last checkpoint
            raise RuntimeError("killed")
        return data.to_tensor(data.sample_shapes(4, batch_rng(0, 0, step))[0])

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
