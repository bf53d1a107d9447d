"""The README names only files that exist (a stale file table is how a reader first learns not to trust a README).
Line counts are left out on purpose: a one-line edit anywhere would otherwise fail CI until the README followed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    named, modules = 0, set()
    for row in (line for line in text.splitlines() if line.startswith("| `")):   # the code table
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        folder = Path(names[0]).parent   # "nano_emu/tiny.py", "emu3.py": later names sit in the first one's folder
        for name in names:
            path = ROOT / (name if "/" in name else folder / name)
            assert path.exists(), f"the README's code table names {path.relative_to(ROOT)}, which does not exist"
            named, modules = named + 1, modules | {path.resolve()}
    for link in re.findall(r"\]\(([^)#]+)\)", text):   # [text](path) links to files in the repo
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"the README links {link}, which does not exist"
    assert named >= 10   # the table is there and read
    missing = sorted(p.name for p in (ROOT / "nano_emu").glob("*.py") if p.name != "__init__.py" and p.resolve()
                     not in modules)
    assert not missing, f"the README's code table leaves out nano_emu/{', '.join(missing)}: a reader cannot find them"
