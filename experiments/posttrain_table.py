"""The post-training tables and curves of docs/post_training.md, from the runs' own files (metrics.json,
metrics_before.json, curve.jsonl): nothing is typed in by hand.

    python experiments/posttrain_table.py --run NAME=DIR [--run NAME=DIR ...] [--curves docs/img/posttrain_curve.png]

A DIR is a posttrain.py output (its parent's figures come from metrics_before.json) or a train_tiny.py run.
"""
import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from nano_emu.scenes import CATEGORIES

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
p.add_argument("--curves", default=None, help="also plot the runs' curves (overall, seen) into this PNG")
p.add_argument("--checked", default=None, help="also put the runs' checked.png side by side into this PNG")
args = p.parse_args()
runs = [(name, Path(folder)) for name, folder in (r.split("=", 1) for r in args.run)]


def cell(metrics: dict, key: str, percent: bool = False) -> str:
    value = metrics.get(key)
    return "" if value is None else f"{100 * value:.1f}%" if percent else f"{value:.3f}"


print("| run | overall seen / held-out, CFG 2 | at cfg 1 | " + " / ".join(c.replace("_", " ") for c in CATEGORIES)
      + ", seen, CFG 2 | QA seen / held-out | captions exact | memorised | minutes |")
print("|---|---:|---:|---|---:|---:|---:|---:|")
for name, folder in runs:
    if not (folder / "metrics.json").is_file():   # a stage stopped before its evaluation: its curve only
        continue
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [(name, metrics)]
    if (folder / "metrics_before.json").is_file() and name.endswith("+"):   # "NAME+": its parent's row first
        rows.insert(0, (name[:-1] + " (before)", json.loads((folder / "metrics_before.json").read_text())))
    for label, m in [(label.rstrip("+"), m) for label, m in rows]:
        print(f"| {label} | {cell(m, 'adherence_seen_cfg2')} / {cell(m, 'adherence_heldout_cfg2')} | "
              f"{cell(m, 'adherence_seen_cfg1')} / {cell(m, 'adherence_heldout_cfg1')} | "
              + " / ".join(f"{m.get(f'{c}_seen_cfg2', float('nan')):.2f}" for c in CATEGORIES)
              + f" | {cell(m, 'qa_accuracy_seen', True)} / {cell(m, 'qa_accuracy_heldout', True)} | "
              f"{cell(m, 'caption_exact_seen', True)} | {cell(m, 'memorised_seen', True)} | "
              f"{m.get('posttrain_minutes', '')} |")

if args.curves:
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2)
    for ax, cfg in zip(axes, ("cfg2", "cfg1")):
        for name, folder in runs:
            path = folder / "curve.jsonl"
            if not path.is_file():
                continue
            curve = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            line, = ax.plot([r["minutes"] for r in curve], [r[f"seen_{cfg}"] for r in curve], marker="o", lw=1.2,
                            label=f"{name.rstrip('+')}, seen")
            ax.plot([r["minutes"] for r in curve], [r[f"heldout_{cfg}"] for r in curve], marker="x", lw=1, ls="--",
                    color=line.get_color(), label=f"{name.rstrip('+')}, held-out")
        ax.set(title=f"overall score at {'CFG 2' if cfg == 'cfg2' else 'cfg 1 (no guidance)'}",
               xlabel="minutes of post-training (1 thread, shared machine)", ylim=(0, 0.7))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(args.curves, dpi=110)
    print(f"wrote {args.curves}")

if args.checked:   # the evaluation's drawings per category, read back by the checker, one run beside the other
    from PIL import Image, ImageDraw
    pictures = [(name.rstrip("+"), Image.open(folder / "checked.png").convert("RGB")) for name, folder in runs]
    height = min(picture.height for _, picture in pictures)
    pictures = [(name, picture.resize((round(picture.width * height / picture.height), height)))
                for name, picture in pictures]
    canvas = Image.new("RGB", (sum(picture.width for _, picture in pictures), height + 30), "white")
    x = 0
    for name, picture in pictures:
        canvas.paste(picture, (x, 30))
        ImageDraw.Draw(canvas).text((x + 10, 8), name, fill="black")
        x += picture.width
    canvas.save(args.checked)
    print(f"wrote {args.checked}")
