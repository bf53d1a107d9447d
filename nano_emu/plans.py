"""A plan before the picture: the scene's layout in words, written between the caption and the image.

Generation chain-of-thought for images (the model first states the layout in words, then draws from it): a
scenes caption says *what* ("a red circle left of a blue square"); the plan says *where*, object by object, in the
order the image is drawn (top to bottom, then left to right, by centroid), in thirds of the canvas:

    "small red circle at middle left then large blue square at middle right"

Training strings carry the true plan of every training picture (the world knows it); at sampling the model writes
its own plan after the caption, then draws the image from caption and plan (layout.py's BOP ... EOP segment;
Pipeline.draw_stream). The plan turns binding and position into text -> text (which the model learns well: it
captions at 75%+) and text -> picture for one object at a named place (which the shapes world draws at 95%).
`read` parses a plan strictly (None for anything the grammar cannot say), `agrees` checks a plan against the
caption it was written for, so a wrong plan and a wrong drawing can be told apart.
"""

import re
from typing import NamedTuple

from . import scenes
from .shapes import COLORS, SHAPES

ROWS = ("top", "middle", "bottom")      # thirds of the canvas, top to bottom
COLUMNS = ("left", "middle", "right")   # and left to right
WORDS = ["at", "then", *dict.fromkeys(ROWS + COLUMNS)]   # what a plan adds to the scenes vocabulary
SEPARATOR = " then "


class Planned(NamedTuple):
    """One object of a plan: what it is and which third of the canvas (row, column) its centroid lies in."""
    size: str
    color: str
    shape: str
    row: str
    column: str


def _third(coordinate: float) -> int:
    return min(2, int(3 * coordinate / scenes.CANVAS))


def planned(objects) -> list[Planned]:
    """Objects (scenes.Obj: colour, shape, size, centroid) -> their plan entries, in drawing order."""
    ordered = sorted(objects, key=lambda o: (_third(o.y), o.x))
    return [Planned(o.size, o.color, o.shape, ROWS[_third(o.y)], COLUMNS[_third(o.x)]) for o in ordered]


def write(objects) -> str:
    """The plan of a picture with these objects."""
    return SEPARATOR.join(f"{p.size} {p.color} {p.shape} at {p.row} {p.column}" for p in planned(objects))


_ENTRY = re.compile(rf"({'|'.join(scenes.SIZE_HALVES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
                    rf"at ({'|'.join(ROWS)}) ({'|'.join(COLUMNS)})")


def read(text: str) -> list[Planned] | None:
    """The entries of a plan, or None where the text is not a plan of 1 to scenes.MAX_OBJECTS objects."""
    parts = " ".join(text.split()).split(SEPARATOR)
    matches = [_ENTRY.fullmatch(part) for part in parts]
    if not 1 <= len(parts) <= scenes.MAX_OBJECTS or not all(matches):
        return None
    return [Planned(*m.groups()) for m in matches]


def agrees(plan: str, caption: str) -> bool:
    """Whether a plan draws what a scenes caption asks: its objects are exactly what the caption names (count and
    words) and, for a position caption, the two named things sit in the relation by their thirds (clearly: a
    different row or column along the relation's axis)."""
    entries, prompt = read(plan), scenes.parse(caption)
    if entries is None or prompt is None or len(entries) != prompt.count * len(prompt.things):
        return False
    found = [[e for e in entries if e.shape == t.shape and t.color in (None, e.color) and t.size in (None, e.size)]
             for t in prompt.things]
    if prompt.category == "counting":
        return len(found[0]) == prompt.count
    if not all(found) or len({id(e) for group in found for e in group}) < len(prompt.things):
        return False
    if prompt.relation is None:
        return True
    axis, sign = {"left of": (COLUMNS, 1), "right of": (COLUMNS, -1), "above": (ROWS, 1), "below": (ROWS, -1)}[
        prompt.relation]
    where = (lambda e: COLUMNS.index(e.column)) if axis is COLUMNS else (lambda e: ROWS.index(e.row))
    return any(sign * (where(b) - where(a)) > 0 for a in found[0] for b in found[1])
