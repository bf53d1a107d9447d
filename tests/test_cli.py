"""The command line refuses nonsense in one line and exit code 2, before any model is loaded; bugs still raise.

Most cases parse in-process (no checkpoint is needed: flags are checked before anything loads); a handful run the
scripts as a user does, to see exactly what reaches the terminal: one line on stderr, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample
import train_tiny

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
    (["--progress", "fill.png"], "--progress"),
    (["--ckpt", "no/such/folder"], "--ckpt"),
    (["--vq", "."], "--vq"),
    (["--cdk-k", "0"], "--cdk-k"),
    (["--keep-rows", "-1"], "--keep-rows"),
    (["--chameleon", "no/such/folder"], "--chameleon"),
    (["--frames", "6"], "--frames"),              # the VQ packs 4 frames into one code frame
    (["--frames", "0"], "--frames"),
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
    line = result.stderr.strip().splitlines()[-1]
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
                                          (["--vq-clip-batch", "0"], "--vq-clip-batch")])
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
