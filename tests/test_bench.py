"""bench.py: every subcommand runs to its table on a tiny model in seconds (a benchmark that prints nothing, or
dies after a GPU's minutes of setup, is found here instead), and `gpu --dry-run` writes the whole GPU table."""

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench.py sits at the repo root
import bench  # noqa: E402


def run(capsys, *argv) -> str:
    bench.main(list(argv))
    return capsys.readouterr().out


def table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as {header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def positive(*values) -> bool:
    """Every figure is a finite number above zero: a benchmark that prints nan, inf, 0 or garbage fails here."""
    def number(value):
        try:
            return float(str(value).rstrip("x%"))
        except ValueError:
            return float("nan")
    return all(math.isfinite(number(v)) and number(v) > 0 for v in values)


def cache_rows(out: str) -> list[list[str]]:
    """The cache table's rows: tokens, seq len | cache tok/s, ms/token | recompute tok/s, ms/token | speed-up."""
    return [line.replace("|", " ").split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+ \|", line)]


def test_no_subcommand_is_cache(capsys):
    out = run(capsys, "--layers", "1", "--dim", "64", "--h", "2", "--w", "2", "--repeats", "1")
    assert "| cache tok/s" in out and "cost per token at 2x" in out
    rows = cache_rows(out)
    assert len(rows) == 2 and all(positive(*row) for row in rows)   # the peer ran: its figures too


def test_cache(capsys):
    out = run(capsys, "cache", "--layers", "1", "--dim", "64", "--h", "2", "--w", "2", "--repeats", "1", "--skip-peer")
    assert "| cache tok/s" in out
    assert all(positive(*row[:4]) for row in cache_rows(out))   # the skipped peer's columns are nan by design


def test_transformers(capsys):
    pytest.importorskip("transformers")
    out = run(capsys, "transformers", "--h", "2", "--w", "2", "--repeats", "1", "--variants", "plain,sjd",
              "--window", "3", "--codebook", "64")
    assert "| grid | tokens | implementation |" in out and "tokens identical" in out
    assert "| nano_emu --sjd 3 |" in out and "--compile" not in out
    rows = table(out)
    assert len(rows) == 9 and all(positive(r["tok/s"], r["ms/token"], r["forwards"], r["vs transformers"]) for r in rows)


def test_sjd(capsys, tmp_path):
    from tiny_run import write_run   # a random run's folder, as train_tiny.py writes it
    out = run(capsys, "sjd", "--ckpt", str(write_run(tmp_path)), "--per-triple", "1", "--max-images", "2",
              "--window", "3", "--coupled")
    assert "| decoding | forwards per draw" in out and "sjd 3 coupled against plain:" in out
    rows = table(out)
    assert len(rows) == 3 and all(positive(r["forwards per draw of 1 (75 tokens each)"], r["images/s"]) for r in rows)


def test_a_trained_checkpoint_in_transformers_draws_what_nano_emu_draws(capsys, tmp_path):
    """bench.py sjd --transformers: the checkpoint's GPT converted into Emu3ForConditionalGeneration through the
    transformers key layout; greedy, both draw the same codes for every caption (captions of two token lengths)."""
    pytest.importorskip("transformers")
    import dataclasses
    import torch
    from nano_emu import shapes
    from nano_emu.tiny import load_tiny
    from tiny_run import write_run
    pipe = load_tiny(write_run(tmp_path))
    with torch.no_grad():   # peaked logits: no near-ties for two implementations to break differently
        for p in pipe.gpt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.sampling = dataclasses.replace(pipe.sampling, temperature=0.0)
    captions = [shapes.caption("red", "circle", "center"), shapes.caption("blue", "square", "top left"),
                shapes.caption("green", "triangle", "bottom right")]
    mine = list(pipe.draw_stream(captions, seed=0))[-1].codes
    theirs = bench.transformers_draw(bench.emu3_from_tiny(pipe), pipe, captions, seed=0)
    assert len({len(pipe.tokenizer.encode(c)) for c in captions}) == 2
    assert torch.equal(mine, theirs)
    out = run(capsys, "sjd", "--ckpt", str(tmp_path), "--per-triple", "1", "--max-images", "2", "--window", "3",
              "--transformers")
    assert "| transformers generate |" in out and "plain against transformers generate:" in out


def test_emu3(capsys):
    out = run(capsys, "emu3", "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--h", "3", "--w", "3",
              "--variants", "plain,sjd", "--window", "4")
    assert "| decoding | prefill (s) |" in out and "| plain |" in out and "| sjd |" in out
    assert all(positive(r["prefill (s)"], r["forwards"], r["decode ms/forward"], r["ms/token"]) for r in table(out))


def test_llamagen(capsys):
    out = run(capsys, "llamagen", "GPT-B", "--tiny")
    assert "s per image" in out
    assert positive(*re.search(r"\(([\d.]+) ms/step, ([\d.]+) image tokens/s\)", out).groups())


def test_chameleon(capsys):
    out = run(capsys, "chameleon", "--tiny", "--steps", "2")
    assert "s per image" in out and positive(re.search(r"GPT: ([\d.]+) ms/step", out).group(1))


def test_gpu_dry_run_writes_the_whole_table(capsys, tmp_path):
    out = tmp_path / "gpu.md"
    run(capsys, "gpu", "--dry-run", "--out", str(out))
    written = out.read_text()
    for row in ("| Emu3-Gen 4x4 CFG 3 | plain |", "| compiled |", "| sjd |", "LlamaGen GPT-XL", "Chameleon-7B"):
        assert row in written
    rows = table(written)
    assert len(rows) == 5 and all(positive(r["forwards"], r["ms/step"]) for r in rows)


def test_gpu_without_cuda_is_one_line_and_exit_2(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    with pytest.raises(SystemExit) as exit:
        bench.main(["gpu", "--device", "cpu"])
    assert exit.value.code == 2 and "gpu needs a CUDA device" in capsys.readouterr().err


def test_an_unknown_benchmark_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["emu4"])
    assert exit.value.code == 2 and "unknown benchmark 'emu4'" in capsys.readouterr().err
