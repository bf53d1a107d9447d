"""The walkthrough notebook runs top to bottom (its code cells, in order, in one namespace)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(monkeypatch, capsys):
    monkeypatch.chdir(NOTEBOOK.parents[1])
    namespace = {}
    for i, cell in enumerate(json.loads(NOTEBOOK.read_text())["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {i}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "round trip: " in printed and "| True" in printed
    assert "LayoutError" in printed
    assert "8.49" in printed   # the Emu3-8B parameter count, in billions
