"""The command line refuses nonsense in one line and exit code 2, before any model is loaded; bugs still raise.

Most cases parse in-process (no checkpoint is needed: flags are checked before anything loads); a handful run the
scripts as a user does, to see exactly what reaches the terminal: one line on stderr, no traceback."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
import train_tiny
from nano_emu.sampler import Guidance, Sampling
from nano_emu.tiny import load_tiny
from tiny_run import write_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    return str(folder)   # the flags are refused before the folder's files are looked at


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "-1"], "--temperature"),   # was "codes must lie in [0, 512), got min -264"
    (["--temperature", "nan"], "--temperature"),
    (["--top-k", "0"], "--top-k"),                # was a tensor size mismatch
    (["--top-k", "2.5"], "--top-k"),
    (["--top-p", "0"], "--top-p"),                # drops every token: the sampler drew padding
    (["--top-p", "1.5"], "--top-p"),
    (["--cfg", "0"], "--cfg"),
    (["--cfg", "-2"], "--cfg"),
    (["--n", "0"], "--n"),
    (["--ratio", "16x9"], "--ratio"),
    (["--ratio", "0:1"], "--ratio"),              # was a ZeroDivisionError
    (["--ratio", "-1:1"], "--ratio"),
    (["--seed", "-1"], "--seed"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--out", "grid.txt"], "--out"),
    (["--out", "grid.xbm"], "--out"),             # PIL lists XBM as writable, but only 1-bit: failed after drawing
    (["--out", "grid.h5"], "--out"),              # a stub without a writer: failed after drawing
    (["--device", "foo"], "--device"),            # was torch's RuntimeError listing every device type it knows
    (["--device", "cuda:99"], "--device"),
    (["--progress", "fill.png"], "--progress"),
    (["--ckpt", "no/such/folder"], "--ckpt"),
    (["--vq", "."], "--vq"),
    (["--cdk-k", "0"], "--cdk-k"),
    (["--keep-rows", "-1"], "--keep-rows"),
    (["--chameleon", "no/such/folder"], "--chameleon"),
    (["--frames", "6"], "--frames"),              # the VQ packs 4 frames into one code frame
    (["--frames", "0"], "--frames"),
    (["--coupled"], "--sjd"),                     # coupled redraws are a kind of SJD
])
def test_sample_refuses_a_bad_flag_in_one_line(flags, named, ckpt, capsys):
    with pytest.raises(SystemExit) as exit:
        sample.parse_args(["--ckpt", ckpt, "--prompt", "a red circle in the center"] + flags)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and named in err, err


def test_sample_refuses_bad_paths_in_one_line(ckpt, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    a_file = tmp_path / "file"
    a_file.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    for flags, says in [(["--caption", str(not_an_image)], "cannot read image file"),
                        (["--caption", str(tmp_path / "missing.png")], "cannot read image file"),
                        (["--prompt", "x", "--out", str(a_file / "sub" / "x.png")], "is a file, not a folder"),
                        (["--prompt", "x", "--out", str(tmp_path)], "needs the suffix"),
                        ([], "nothing to do"),
                        (["--weights", ckpt, "--prompt", "x"], "give one of --ckpt"),
                        (["--chameleon", ckpt, "--prompt", "x"], "give one of --ckpt"),
                        (["--prompt", "x", "--keep-rows", "2"], "--complete and --keep-rows go together"),
                        (["--prompt", "x", "--tokenizer-dir", ckpt], "--tokenizer-dir goes with --chameleon"),
                        (["--prompt", "x", "--frames", "8", "--progress", str(tmp_path / "p.gif")], "--progress"),
                        (["--caption", str(empty)], "no frames in folder"),
                        ]:
        with pytest.raises(SystemExit) as exit:
            sample.parse_args(["--ckpt", ckpt] + flags)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and says in err, (flags, err)


def test_sample_accepts_the_edges_of_each_range(ckpt, tmp_path):
    shape = tmp_path / "shape.png"
    Image.new("RGB", (64, 64)).save(shape)
    args = sample.parse_args(["--ckpt", ckpt, "--prompt", "x", "--temperature", "0", "--top-k", "1", "--top-p", "1",
                              "--cfg", "0.5", "--ratio", "1.5:1", "--seed", str(2**64 - 1), "--n", "1",
                              "--out", str(tmp_path / "not" / "yet" / "there.JPG"),
                              "--progress", str(tmp_path / "fill.GIF"), "--caption", str(shape)])
    assert (args.temperature, args.top_k, args.top_p, args.cfg, args.ratio) == (0.0, 1, 1.0, 0.5, "1.5:1")


def run(script, *flags, code=None):
    """A script as a user runs it; `code` (optional) runs first, e.g. to plant a bug."""
    cmd = [sys.executable, str(ROOT / script), *flags] if code is None else \
        [sys.executable, "-c", f"{code}; import runpy, sys; sys.argv = sys.argv[1:]; "
                               f"runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / script), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *says):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().split("\n")[-1]   # not splitlines: it splits at the progress line's \r too
    assert ".py: error: " in line and all(s in line for s in says), line


def test_sample_script_refuses_a_bad_flag_in_one_line(ckpt):
    result = run("sample.py", "--ckpt", ckpt, "--prompt", "a red circle in the center", "--top-k", "0")
    assert_one_line_error(result, "--top-k", ">= 1")
    assert result.stderr.count("\n") == 1   # the one line and nothing else: no usage dump


def test_sample_script_reports_the_librarys_input_errors_in_one_line(ckpt):
    # a folder without the checkpoint files: load_tiny's FileNotFoundError
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--prompt", "x"), "gpt.safetensors", "is missing")
    # files that are not safetensors: load_checkpoint's ValueError
    for name in ("vq.safetensors", "gpt.safetensors"):
        (Path(ckpt) / name).write_bytes(b"\0" * 64)
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--prompt", "x"), "vq.safetensors",
                          "not a readable safetensors file")


def test_sample_script_still_shows_a_bugs_traceback(ckpt):
    bug = "import nano_emu.tiny as p; p.load_tiny = lambda *a, **k: [][0]"   # an IndexError, not the user's
    result = run("sample.py", "--ckpt", ckpt, "--prompt", "x", code=bug)
    assert result.returncode == 1 and "Traceback" in result.stderr and "IndexError" in result.stderr


@pytest.mark.parametrize("flags, named", [(["--vq-steps", "0"], "--vq-steps"), (["--gpt-lr", "-1e-3"], "--gpt-lr"),
                                          (["--gpt-batch", "0"], "--gpt-batch"), (["--pool", "many"], "--pool"),
                                          (["--gpt-dim", "-64"], "--gpt-dim"), (["--ckpt-every", "0"], "--ckpt-every"),
                                          (["--cfg", "0"], "--cfg"), (["--seed", "-1"], "--seed"),
                                          (["--gpt-clip-share", "1"], "--gpt-clip-share"),
                                          (["--vq-clip-share", "0.6"], "--vq-clip-share"),
                                          (["--vq-clip-batch", "0"], "--vq-clip-batch"),
                                          (["--device", "foo"], "--device"),
                                          (["--out", str(ROOT / "README.md")], "--out")])   # a file
def test_train_tiny_refuses_a_bad_number(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train_tiny.parse_args(["--out", str(tmp_path / "run")] + flags)
    assert exit.value.code == 2
    assert f"error: argument {named}: " in capsys.readouterr().err


def test_train_tiny_script_refuses_a_bad_number(tmp_path):
    result = run("train_tiny.py", "--quick", "--out", str(tmp_path / "run"), "--vq-steps", "0")
    assert_one_line_error(result, "--vq-steps", ">= 1")
    assert result.stderr.count("\n") == 1   # the one line and nothing else: no usage dump
    assert not (tmp_path / "run").exists()


def test_sample_refuses_a_device_this_build_lacks(ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA build with a GPU: --device cuda is fine here")
    with pytest.raises(SystemExit):   # was "AssertionError: Torch not compiled with CUDA enabled" after loading
        sample.parse_args(["--ckpt", ckpt, "--prompt", "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --device: cuda: " in err and "--device cpu" in err, err


def test_progress_may_not_overwrite_out(ckpt, tmp_path, capsys):
    for out, progress in [("fill.gif", "fill.gif"), ("fill.gif", "./sub/../fill.gif")]:
        with pytest.raises(SystemExit):   # was: the GIF silently replaced the drawn image
            sample.parse_args(["--ckpt", ckpt, "--prompt", "x", "--out", str(tmp_path / out),
                               "--progress", str(tmp_path / progress)])
        assert "--progress and --out name the same file" in capsys.readouterr().err


# every value a sampling flag may take from the command line, and what the Python API makes of it
VALUES = ["-1", "-0.5", "0", "0.5", "1", "1.5", "2", "7", "nan", "inf", "-inf", "1e9"]


@pytest.mark.parametrize("flag, options, name, kind", [("--temperature", Sampling, "temperature", float),
                                                        ("--top-p", Sampling, "top_p", float),
                                                        ("--top-k", Sampling, "top_k", int),
                                                        ("--cdk-k", Guidance, "cdk_k", int),
                                                        ("--cfg", Guidance, "cfg_scale", float)])
def test_the_command_line_and_the_python_api_refuse_the_same_values(ckpt, flag, options, name, kind, capsys):
    for text in VALUES:
        try:
            value = kind(text)
        except ValueError:   # "0.5" for an integer flag: argparse refuses the text itself
            value = None
        try:
            api_ok = value is not None and options(**{name: value}) is not None
        except ValueError:
            api_ok = False
        try:
            sample.parse_args(["--ckpt", ckpt, "--prompt", "x", flag, text])
            cli_ok = True
        except SystemExit:
            cli_ok = False
            assert f"argument {flag}: " in capsys.readouterr().err
        if flag == "--cfg":   # stricter on purpose: --cfg 0 or below is a typo far more often than an experiment
            assert cli_ok == (api_ok and value > 0), text
        else:
            assert cli_ok == api_ok, (flag, text)


# ---------------------------------------------------------------------------------------- with a checkpoint there

PROMPT = "a red circle in the top left"



@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("random_run"))


def test_sample_script_refuses_another_runs_vq(random_run, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(random_run / "gpt.safetensors", mixed)
    shutil.copy(write_run(tmp_path / "other", seed=1) / "vq.safetensors", mixed)
    result = run("sample.py", "--ckpt", str(mixed), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, f"{mixed / 'gpt.safetensors'} was trained on another VQ")


def test_sample_script_refuses_more_images_than_memory_holds(random_run, tmp_path):
    """--n 10000 against 1 GiB free (set by hand so the test never allocates much): a cache of 20,000 rows
    (CFG) of 128 tokens is 1.5 GiB. Before, the allocation was tried (26 GB for --n 100000 in the report)."""
    result = run("sample.py", "--ckpt", str(random_run), "--prompt", PROMPT, "--n", "10000", "--out",
                 str(tmp_path / "x.png"), "--device", "cpu",
                 code="import nano_emu.engine as e; e.free_memory = lambda device: 2**30")
    assert_one_line_error(result, "a KV cache for 20000 rows of 128 tokens", "needs 1.5 GiB, more than the 1.0 GiB "
                                  "free on cpu", "a smaller --n")
    assert not (tmp_path / "x.png").exists()


def _limit_file_size():
    """In the child: files may not grow past 2,000 bytes, and a write past it fails (EFBIG) instead of killing."""
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))


def test_a_write_that_fails_midway_leaves_the_previous_image(random_run, tmp_path):
    """A full disk, as a file-size limit: PIL's write fails after 2,000 bytes. Before, the PNG was left torn
    (truncated to the limit; on a full disk, 0 bytes) and the error was a traceback."""
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous image")
    cmd = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(random_run), "--prompt", PROMPT, "--n", "4",
           "--out", str(out), "--device", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert_one_line_error(result, f"cannot write {out}: File too large")
    assert out.read_bytes() == b"the previous image" and not (tmp_path / "grid.png.tmp").exists()


def test_sample_script_cleans_a_killed_writes_tmp_and_writes_atomically(random_run, tmp_path):
    out = tmp_path / "x.png"
    (tmp_path / "x.png.tmp").write_bytes(b"left by kill -9")
    result = run("sample.py", "--ckpt", str(random_run), "--prompt", PROMPT, "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"note: removed {out}.tmp" in result.stdout
    assert Image.open(out).size == (64, 64) and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_an_error_while_drawing_starts_a_line_of_its_own(random_run, tmp_path):
    """Before: '  row    1/8 ... ETA  0.3ssample.py: error: ...' on the progress line."""
    fault = ("import nano_emu.pipeline as p\n"
             "def decode(self, *a, **k): raise ValueError('the VQ could not decode')\n"
             "p.Pipeline.decode = decode")
    result = run("sample.py", "--ckpt", str(random_run), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"),
                 "--progress", str(tmp_path / "x.gif"), "--device", "cpu", code=fault)
    assert result.returncode == 2 and "row" in result.stderr
    assert result.stderr.split("\n")[-2] == "sample.py: error: the VQ could not decode", repr(result.stderr)


def test_a_clip_too_long_for_the_context_says_how_many_frames_fit(tmp_path):
    """Before: 'prompt of 1835 tokens + 256 new tokens exceeds the model's context of 512 tokens; shorten the
    prompt or generate less' -- for a clip, which has no prompt to shorten."""
    folder = write_run(tmp_path / "video", video=True)
    gif = tmp_path / "long.gif"
    frames = [Image.new("RGB", (64, 64), (8 * k, 0, 0)) for k in range(100)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    result = run("sample.py", "--ckpt", str(folder), "--caption", str(gif), "--device", "cpu")
    assert_one_line_error(result, "the clip is too long for this model: its 100 frames are 25 code frames",
                          "exceed its context of 512 tokens; it holds clips of at most 12 frames")
    pipe = load_tiny(folder)
    assert isinstance(pipe.answer_clip(frames[:12], max_new_tokens=256), str)   # 12 do fit
    with pytest.raises(ValueError, match="at most 12 frames"):
        pipe.answer_clip(frames[:16], max_new_tokens=256)
    assert isinstance(pipe.answer_clip(frames[:16], max_new_tokens=64), str)    # with a shorter answer, 16 do
