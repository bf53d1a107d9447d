"""Your own images: train_tiny.py --data FOLDER on a captioned folder (Hugging Face's imagefolder: metadata.jsonl)
and on class folders (torchvision's ImageFolder), end to end through sample.py; and every kind of bad data refused
in one line, exit 2, before a single training step."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nano_emu import shapes
from nano_emu.folder import Folder, FolderError, load_square, scan, split_indices
from nano_emu.tiny import choose_tokenizer, load_tiny

ROOT = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue")
SHAPES = ("circle", "square")


def picture(color: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """A shape of the toy world at a random size and place, drawn on a canvas of a random size and aspect."""
    image = shapes.render(color, shape, "center", size=int(rng.integers(9, 13)), dx=int(rng.integers(-3, 4)))
    w, h = int(rng.integers(48, 120)), int(rng.integers(48, 120))
    return np.asarray(Image.fromarray(image).resize((w, h), Image.NEAREST))


def save(array: np.ndarray, path: Path, mode: str) -> None:
    """Save one uint8 RGB array as a file of the given PIL mode (RGBA, L, P, I;16 or RGB)."""
    image = Image.fromarray(array)
    if mode == "RGBA":
        alpha = np.where(array.max(-1) > 0, 255, 0).astype(np.uint8)      # the black background transparent
        image = Image.fromarray(np.dstack([array, alpha]), "RGBA")
    elif mode == "I;16":
        image = Image.fromarray(array.max(-1).astype(np.uint16) * 257)   # uint16: mode I;16
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


MODES = [("RGB", ".png"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"), ("RGB", ".jpg")]


def captioned_folder(root: Path, n: int = 240, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        color, shape = COLORS[i % 3], SHAPES[(i // 3) % 2]
        mode, suffix = MODES[i % len(MODES)]
        name = f"{shape}s/{i:03d}{suffix}"   # subfolders allowed
        save(picture(color, shape, rng), root / name, mode if suffix == ".png" else "RGB")
        rows.append({"file_name": name, "text": f"a {color} {shape}" if mode not in ("L", "I;16") else f"a grey {shape}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def class_folder(root: Path, per_class: int = 40, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for color in COLORS:
        for i in range(per_class):
            save(picture(color, SHAPES[i % 2], rng), root / color / f"{i:02d}.png", "RGB")
    return root


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


# ------------------------------------------------------------------------------------------------ reading


def test_scan_and_split_follow_the_two_conventions(tmp_path):
    kind, pairs = scan(captioned_folder(tmp_path / "c", n=24))
    assert kind == "captioned" and len(pairs) == 24 and pairs[0][1] == "a red circle"
    kind, pairs = scan(class_folder(tmp_path / "k", per_class=4))
    assert kind == "class folders" and sorted({c for _, c in pairs}) == sorted(COLORS)
    # per caption: every class keeps its share on both sides; unique captions: the plain fraction
    captions = [c for c in COLORS for _ in range(20)]
    heldout = split_indices(captions, 0.1, np.random.default_rng(0))
    assert [int(heldout[[i for i, c in enumerate(captions) if c == k]].sum()) for k in COLORS] == [2, 2, 2]
    assert split_indices([str(i) for i in range(50)], 0.1, np.random.default_rng(0)).sum() == 5


def test_every_mode_and_size_comes_out_square_upright_and_in_range(tmp_path):
    """Short side resized, centre cropped; 16-bit scaled (not clipped: a full-white 16-bit image stays white and
    a half-grey one half grey); transparency blended onto the background asked for."""
    grey = np.full((30, 90), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")   # uint16: a 16-bit greyscale PNG
    assert load_square(tmp_path / "grey16.png", 32).shape == (32, 32, 3)
    assert abs(int(load_square(tmp_path / "grey16.png", 32).mean()) - 128) <= 1
    rgba = np.zeros((40, 20, 4), dtype=np.uint8)                          # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert load_square(tmp_path / "clear.png", 16).min() == 255           # white by default
    assert load_square(tmp_path / "clear.png", 16, (0, 0, 0)).max() == 0
    wide = np.zeros((10, 40, 3), dtype=np.uint8)
    wide[:, 18:22] = 255                                                  # a white bar in the middle
    Image.fromarray(wide).save(tmp_path / "wide.png")
    square = load_square(tmp_path / "wide.png", 20)
    assert square.shape == (20, 20, 3) and square[:, 8:12].min() > 200 and square[:, :3].max() < 50


def test_tokenizer_is_words_for_a_small_language_and_bytes_for_a_large_one(tmp_path):
    world = Folder(captioned_folder(tmp_path / "c", n=24), log=lambda *_: None)
    tokenizer, spec = choose_tokenizer("auto", [world])
    assert spec != "bytes" and tokenizer.decode(tokenizer.encode("a grey circle")) == "a grey circle"
    many = tmp_path / "many"
    many.mkdir()
    rows = []
    for i in range(1100):   # 1,100 distinct made-up words: past the word limit
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(many / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "word" + "".join(chr(97 + int(d)) for d in str(i))})
    (many / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert choose_tokenizer("auto", [Folder(many, image_size=32, log=lambda *_: None)])[1] == "bytes"


# ------------------------------------------------------------------------------------------------ bad data


def bad_folders(tmp_path: Path) -> dict:
    cases = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty folder"] = (empty, "has no images")
    one = class_folder(tmp_path / "one", per_class=3)
    for color in COLORS[1:]:
        for f in (one / color).iterdir():
            f.unlink()
        (one / color).rmdir()
    cases["one class"] = (one, "has one class ('red')")
    missing = captioned_folder(tmp_path / "missing", n=6)
    (missing / "metadata.jsonl").write_text((missing / "metadata.jsonl").read_text() +
                                            json.dumps({"file_name": "gone.png", "text": "a cat"}) + "\n")
    cases["row names a missing file"] = (missing, "names 'gone.png', which is not in")
    uncaptioned = captioned_folder(tmp_path / "uncaptioned", n=6)
    save(np.zeros((16, 16, 3), dtype=np.uint8), uncaptioned / "extra.png", "RGB")
    cases["image without a caption"] = (uncaptioned, "have no row in its metadata, so no caption: extra.png")
    blank = captioned_folder(tmp_path / "blank", n=6)
    rows = (blank / "metadata.jsonl").read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "text": "  "})
    (blank / "metadata.jsonl").write_text("\n".join(rows))
    cases["empty caption"] = (blank, "has no caption")
    columns = captioned_folder(tmp_path / "columns", n=6)
    (columns / "metadata.jsonl").write_text("\n".join(
        json.dumps({"image": r["file_name"], "caption": r["text"]})
        for r in map(json.loads, (columns / "metadata.jsonl").read_text().splitlines())))
    cases["wrong columns"] = (columns, "has the columns ['caption', 'image'], not 'file_name' and 'text'")
    broken = captioned_folder(tmp_path / "json", n=6)
    (broken / "metadata.jsonl").write_text((broken / "metadata.jsonl").read_text() + "{not json\n")
    cases["broken JSON"] = (broken, "line 7 is not JSON")
    loose = tmp_path / "loose"
    save(np.zeros((16, 16, 3), dtype=np.uint8), loose / "a.png", "RGB")
    save(np.zeros((16, 16, 3), dtype=np.uint8), loose / "b.png", "RGB")
    cases["images but no captions"] = (loose, "holds 2 image(s) but no captions")
    long = captioned_folder(tmp_path / "long", n=6)
    rows = (long / "metadata.jsonl").read_text().splitlines()
    rows[4] = json.dumps({**json.loads(rows[4]), "text": "a very long caption " * 25})   # 500 bytes
    (long / "metadata.jsonl").write_text("\n".join(rows))
    cases["caption too long for the context"] = (long, "tokens; with the 8x8-code image block")
    return cases


def test_bad_folders_are_refused_in_one_line_before_training(tmp_path):
    for name, (folder, says) in bad_folders(tmp_path).items():
        out = tmp_path / "runs" / name.replace(" ", "_")
        result = run("train_tiny.py", "--quick", "--data", str(folder), "--out", str(out),
                     *(["--tokenizer", "bytes"] if "long" in name else []))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], (name, result.stderr)
        assert "vq:" not in result.stderr and not (out / "vq.safetensors").exists(), name   # nothing trained


def test_unreadable_images_are_listed_and_skipped_or_refused_with_strict(tmp_path, capsys):
    folder = class_folder(tmp_path / "k", per_class=4)
    (folder / "red" / "00.png").write_bytes(b"not a png")
    good = (folder / "blue" / "00.png").read_bytes()
    (folder / "blue" / "01.png").write_bytes(good[:len(good) // 2])            # truncated
    world = Folder(folder, log=print)
    assert world.skipped == 2 and len(world.captions) == 10
    said = capsys.readouterr().out
    assert "skipping 2 of 12 images cannot be read" in said and "red/00.png" in said and "blue/01.png" in said
    with pytest.raises(FolderError, match="--strict refuses them"):
        Folder(folder, strict=True)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("make", [captioned_folder, class_folder], ids=["captioned", "class folders"])
def test_quick_run_on_a_folder_trains_samples_and_captions(make, tmp_path):
    folder, out = make(tmp_path / "data"), tmp_path / "run"
    result = run("train_tiny.py", "--quick", "--data", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_gpt_loss"] < 0.8 * metrics["first_gpt_loss"]
    for k in ("vq_psnr_db", "nll_seen", "nll_heldout", "caption_accuracy_heldout"):   # captions repeat in both
        assert k in metrics and np.isfinite(metrics[k]), k
    assert (out / "samples.png").is_file() and (out / "captions.png").is_file()
    pipe = load_tiny(out)
    caption = "a red circle" if make is captioned_folder else "red"
    result = run("sample.py", "--ckpt", str(out), "--prompt", caption, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "x.png").size == (64, 64)
    some_image = next(p for p in sorted(folder.rglob("*.png")))
    result = run("sample.py", "--ckpt", str(out), "--caption", str(some_image))
    assert result.returncode == 0 and str(some_image) in result.stdout, result.stderr[-2000:]
    assert pipe.grid() == (8, 8)
