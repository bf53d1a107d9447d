"""The README's file table keeps its line counts true, and every file it names exists (a stale table is how a
reader first learns not to trust a README)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_file_tables_line_counts_are_the_files():
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    checked = 0
    for row in rows:
        files, counts = row.split("|")[1], row.split("|")[2]
        names = re.findall(r"`([^`]+)`", files)
        numbers = [int(n) for n in re.findall(r"\d+", counts)]
        if not numbers:
            continue
        folder = Path(names[0]).parent   # "nano_emu/tiny.py", "emu3.py": later names sit in the first one's folder
        paths = [ROOT / (name if "/" in name else folder / name) for name in names]
        assert len(paths) == len(numbers), row
        for path, n in zip(paths, numbers):
            assert path.is_file(), f"the README names {path.relative_to(ROOT)}, which does not exist"
            assert len(path.read_text().splitlines()) == n, f"{path.relative_to(ROOT)} has " \
                f"{len(path.read_text().splitlines())} lines, the README says {n}"
            checked += 1
    assert checked >= 20   # the table is there and read
