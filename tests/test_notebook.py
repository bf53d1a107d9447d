"""Every notebook in notebooks/ runs headlessly, top to bottom, in a real kernel (nbclient); a cell that raises
fails the test. The notebooks assert their own claims (cached decoding equals full recompute, the placeholder pass
predicts from placeholders only, constrained samples always parse, the VQ's time axis is causal, both Emu3 layouts
load the same weights), so a regression in the modules they call turns this red.

Quick mode: NANO_EMU_NB_QUICK=1 (fewer samples) and one --quick checkpoint, trained once for all of them and
passed as NANO_EMU_CKPT. The committed notebooks carry the outputs of the default model (out/tiny); a second test
checks that they do (pictures present, no error outputs), since a notebook committed without outputs shows no
pictures on the web."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def quick_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks") / "quick"
    subprocess.run([sys.executable, "train_tiny.py", "--quick", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out


def test_the_index_lists_every_notebook_and_nothing_else():
    """notebooks/README.md is how a reader finds them: every notebook is linked there, and every link resolves."""
    index = (ROOT / "notebooks" / "README.md").read_text()
    linked = set(re.findall(r"\]\(([^)#]+\.ipynb)\)", index))
    assert NOTEBOOKS and linked == {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, quick_checkpoint, request, monkeypatch):
    if path.stem.startswith("05"):
        pytest.importorskip("transformers")   # 05 writes its tiny released-layout checkpoint with transformers
    if path.stem.startswith(("06", "07")):     # 06 and 07 draw scenes: the --world scenes --quick run (conftest.py)
        monkeypatch.setenv("NANO_EMU_SCENES_CKPT", str(request.getfixturevalue("quick_scenes_run")[0]))
    monkeypatch.setenv("NANO_EMU_CKPT", str(quick_checkpoint))   # the kernel inherits this process's environment
    monkeypatch.setenv("NANO_EMU_NB_QUICK", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}}, record_timing=False)
    client.execute()   # raises CellExecutionError, with the cell and its traceback, if any cell fails


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_its_outputs(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in cells), f"{path.name}: committed without running every cell"
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name}: committed with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: committed without its pictures"
