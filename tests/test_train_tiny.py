"""The tiny end to end: train_tiny.py --quick learns and writes what sample.py reads; resume replays exactly;
torchrun runs it data parallel. (The acceptance figures come from the full default run, see the README.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train_tiny
from nano_emu import recipe
from nano_emu import shapes
from nano_emu.checkpoint import load_checkpoint
from nano_emu.image import load_clip
from nano_emu.tiny import load_tiny
from nano_emu.train import Distributed, batch_rng, fit
from nano_emu.image import to_tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    torch.set_num_threads(2)
    metrics = train_tiny.main(train_tiny.parse_args(["--quick", "--out", str(out), "--device", "cpu"]))
    return out, metrics


def test_quick_run_learns_and_writes_everything(quick_run):
    out, metrics = quick_run
    assert metrics["final_vq_recon"] < 0.5 * metrics["first_vq_recon"]
    assert metrics["final_gpt_loss"] < 0.8 * metrics["first_gpt_loss"]
    for name in ("vq.safetensors", "gpt.safetensors", "metrics.json", "loss.png", "samples.png",
                 "samples_cfg1.png", "captions.png", "fill.png", "checked.png"):
        assert (out / name).is_file(), name
    assert not (out / "answers.png").exists()   # the shapes world asks no questions
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("loss.png", "samples.png"):
        assert Image.open(out / name).size[0] > 200   # a real picture, not an empty file
    _, meta, _ = load_checkpoint(out / "gpt.safetensors")
    assert meta["step"] == meta["steps"] == 40


def test_refuses_to_overwrite_a_run(quick_run):
    out, _ = quick_run
    with pytest.raises(recipe.UsageError, match="--resume"):
        train_tiny.main(train_tiny.parse_args(["--quick", "--out", str(out)]))


def test_sample_draws_a_grid_a_progress_gif_and_a_caption(quick_run, tmp_path, capsys):
    out, _ = quick_run
    shape = tmp_path / "shape.png"
    Image.fromarray(shapes.render("red", "circle", "top left")).save(shape)
    args = sample.parse_args(["--ckpt", str(out), "--prompt", "a red circle in the top left",
                              "--prompt", "a blue square in the center", "--n", "3", "--out", str(tmp_path / "g.png"),
                              "--progress", str(tmp_path / "g.gif"), "--caption", str(shape), "--device", "cpu"])
    sample.main(args)
    assert Image.open(tmp_path / "g.png").size == (3 * 64, 2 * 64)
    gif = Image.open(tmp_path / "g.gif")
    assert gif.n_frames == 8   # one frame per finished row (PIL folds the held copies of the last into its duration)
    printed = capsys.readouterr()
    assert "tokens/s" in printed.out and f"{shape}:" in printed.out


def test_sample_with_coupled_sjd_draws_what_the_seed_gives(quick_run, tmp_path):
    """--sjd --coupled reaches the pipeline (MC-SJD); greedy, every decoding draws the same image."""
    out, _ = quick_run
    grids = {}
    for name, flags in (("plain", []), ("sjd", ["--sjd", "4"]), ("coupled", ["--sjd", "4", "--coupled"])):
        sample.main(sample.parse_args(["--ckpt", str(out), "--prompt", "a red circle in the top left", "--n", "2",
                                       "--temperature", "0", "--out", str(tmp_path / f"{name}.png"), "--device", "cpu",
                                       *flags]))
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(grids["plain"], grids["sjd"]) and np.array_equal(grids["plain"], grids["coupled"])


def test_an_image_only_checkpoint_refuses_clips(quick_run):
    """Without --video the tiny VQ has no time axis (temporal_factor=1), so a clip is refused before any drawing."""
    out, _ = quick_run
    pipe = load_tiny(out)
    with pytest.raises(ValueError, match="no time axis"):
        pipe.draw(["a red circle moving left"], frames=8)
    with pytest.raises(ValueError, match="no time axis"):
        pipe.answer_clip(shapes.sample_moving_shapes(1, 0)[0][0])


def test_sample_explains_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="vq.safetensors is missing"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path), "--prompt", "a red circle in the top left"]))


@pytest.fixture(scope="module")
def quick_video_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_video")
    torch.set_num_threads(2)
    metrics = train_tiny.main(train_tiny.parse_args(["--quick", "--video", "--out", str(out), "--device", "cpu"]))
    return out, metrics


def test_quick_video_run_trains_on_clips_draws_and_captions_them(quick_video_run, tmp_path, capsys):
    """The whole --video path a user takes: train, draw a clip (sample.py --frames), read its tokens back with
    Layout, caption the GIF it wrote and a folder of its frames."""
    out, metrics = quick_video_run
    assert metrics["final_gpt_loss"] < 0.8 * metrics["first_gpt_loss"]
    for key in ("clip_vq_psnr_db", "clip_adherence_cfg2", "clip_direction_cfg2", "clip_caption_accuracy",
                "adherence_seen_cfg2", "caption_accuracy_seen"):   # clip metrics beside the image ones
        assert key in metrics, key
    assert Image.open(out / "clips.png").size[0] > 300
    _, meta, _ = load_checkpoint(out / "gpt.safetensors")
    assert meta["steps"] == 80   # the quick preset's 40 steps, doubled: half of them train on clips
    _, meta, _ = load_checkpoint(out / "vq.safetensors")
    assert meta["steps"] == 80   # twice the quick preset's 40: clips alternate with images in the second half

    # the VQ's temporal axis is used: 8 frames -> 2 code frames -> 8 frames
    pipe = load_tiny(out)
    clip, _, _ = shapes.sample_moving_shapes(1, 0)
    codes = pipe.vq.encode(to_tensor(clip))
    assert codes.shape == (1, 2, 8, 8) and pipe.vq.decode(codes).shape == (1, 8, 3, 64, 64)

    # a drawn clip, parsed back: the prompt says "2*8*8", the grid has EOF after each code frame
    prompt = "a red circle moving left"
    *_, rows = pipe.draw_stream([prompt], frames=8, seed=0)
    tokens = pipe.layout.generation_prompt(prompt, 8, 8, pipe.tokenizer, t=2) + rows.tokens[0].tolist()
    text, clip_codes = pipe.layout.decode(tokens, pipe.tokenizer)
    assert text == prompt and clip_codes.shape == (2, 8, 8)
    assert torch.equal(clip_codes.flatten(), rows.codes[0].flatten())
    assert rows.tokens[0].tolist().count(pipe.layout.eof) == 2
    frames = pipe.decode(rows.codes, frames=8)[0]
    assert len(frames) == 8 and frames[0].size == (64, 64)

    # sample.py: the same clip as a GIF, then captioned from the GIF and from a folder of its frames
    gif = tmp_path / "clip.gif"
    sample.main(sample.parse_args(["--ckpt", str(out), "--prompt", prompt, "--frames", "8", "--out", str(gif),
                                   "--device", "cpu"]))
    assert len(load_clip(gif)) == 8
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in enumerate(frames):
        frame.save(folder / f"frame_{k:02d}.png")
    capsys.readouterr()
    sample.main(sample.parse_args(["--ckpt", str(out), "--caption", str(gif), "--device", "cpu"]))
    sample.main(sample.parse_args(["--ckpt", str(out), "--caption", str(folder), "--device", "cpu"]))
    printed = capsys.readouterr().out
    assert f"{gif}:" in printed and f"{folder}:" in printed
    # one clip, three ways in: the folder's PNGs are lossless, so they give the answer the frames give
    assert pipe.answer_clip(str(folder)) == pipe.answer_clip(frames) == pipe.answer_clip(np.stack(frames))
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        pipe.answer_clip(frames[:6])


def _regression_task(model, step, crash_at=None, interrupt_at=None):
    if step == crash_at:
        raise RuntimeError("simulated crash")
    if step == interrupt_at:
        raise KeyboardInterrupt
    rng = batch_rng(0, 0, step)
    x = torch.from_numpy(rng.standard_normal((16, 4))).float()
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None]
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss, {"loss": loss.detach()}


@pytest.mark.parametrize("failure", ["crash_at", "interrupt_at"])
def test_resume_after_a_crash_or_ctrl_c_replays_the_uninterrupted_run(tmp_path, failure):
    def train(ckpt, resume=False, **fail):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        fit(model, lambda net, step: _regression_task(net, step, **fail), steps=12, lr=0.05, ckpt_path=ckpt,
            meta={"kind": "test"}, run=Distributed(), ckpt_every=4, resume=resume, warmup=2)
        return model

    reference = train(tmp_path / "ref.safetensors")
    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(RuntimeError if failure == "crash_at" else KeyboardInterrupt):
        train(ckpt, **{failure: 6})
    _, meta, _ = load_checkpoint(ckpt)
    assert meta["step"] == (4 if failure == "crash_at" else 6)   # a crash loses at most one interval
    resumed = train(ckpt, resume=True)
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train_tiny.py"), "--quick", "--out", str(out), "--device", "cpu",
           "--vq-steps", "6", "--gpt-steps", "6", "--pool", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("vq.safetensors", "gpt.safetensors"):
        _, meta, _ = load_checkpoint(out / name)
        assert meta["step"] == 6
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["final_gpt_loss"])


def test_understanding_strings_train_the_unconditional_branch():
    """`BOS image caption EOS` starts exactly like CFG's unconditional string `BOS "" image`, so with
    understood_image_weight its image block carries the loss that the dropped captions used to provide."""
    from nano_emu.layout import Layout
    from nano_emu.tokenizer import WordTokenizer
    from nano_emu.train import sequences
    tok = WordTokenizer(shapes.vocabulary())
    layout = Layout.tiny(64, text_vocab=tok.n_vocab)
    codes = torch.randint(0, 64, (1, 3, 3))
    caption = ["a red circle in the top left"]
    # p_understand=1: always image -> caption
    answers = [[("", caption[0])]]
    inputs, targets, weights = sequences(layout, tok, codes, caption, answers, np.random.default_rng(0),
                                         p_understand=1.0, visual_weight=0.5, understood_image_weight=1.0)
    uncond = layout.encode(["", codes[0]], tok)   # BOS BOI "3*3" IMG rows EOF EOI
    full = torch.cat([inputs[0, :1], targets[0]])
    assert full[:len(uncond)].tolist() == uncond
    visual = layout.is_visual(targets[0])
    assert visual.sum() == 9 and (weights[0][visual] == 0.5).all()
    answer = len(tok.encode(caption[0])) + 1   # the caption and EOS
    assert (weights[0][-answer:] == 1).all()
    # weight 0: only the answer is learned (Emu3's rule)
    _, _, weights = sequences(layout, tok, codes, caption, answers, np.random.default_rng(0), p_understand=1.0)
    assert weights[0].sum() == answer and (weights[0][-answer:] == 1).all()


def test_quick_scenes_run_trains_draws_answers_and_captions(quick_scenes_run, tmp_path, capsys):
    from nano_emu import scenes
    out, metrics = quick_scenes_run
    assert metrics["final_gpt_loss"] < 0.8 * metrics["first_gpt_loss"]
    for name in ("adherence_seen_cfg2", "adherence_heldout_cfg2", "position_seen_cfg2", "counting_heldout_cfg2",
                 "qa_accuracy_seen", "qa_accuracy_heldout", "caption_exact_seen", "caption_accuracy_seen"):
        assert 0.0 <= metrics[name] <= 1.0, name
    for name in ("samples.png", "captions.png", "checked.png", "answers.png"):
        assert Image.open(out / name).size[0] > 200
    _, meta, _ = load_checkpoint(out / "gpt.safetensors")
    assert meta["world"] == "scenes"
    image, caption, _ = scenes.sample_scenes(1, np.random.default_rng(3))
    Image.fromarray(image[0]).save(tmp_path / "x.png")
    sample.main(sample.parse_args(["--ckpt", str(out), "--image", str(tmp_path / "x.png"),
                                   "--question", "how many circles?", "--device", "cpu"]))
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'x.png'}: " in printed   # an answer (from a 40-step model: any words of the world)


def test_world_scenes_picks_its_preset():
    args = recipe.fill_from_preset(train_tiny.parse_args(["--world", "scenes"]))
    assert args.preset == "scenes" and args.gpt_steps == recipe.PRESETS["scenes"]["gpt_steps"]
    assert recipe.fill_from_preset(train_tiny.parse_args([])).preset == "tiny"
    args = recipe.fill_from_preset(train_tiny.parse_args(["--world", "scenes", "--preset", "tiny"]))
    assert args.gpt_steps == recipe.PRESETS["tiny"]["gpt_steps"]
