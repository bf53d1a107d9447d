"""The demo page (demo.py): draw from a prompt and watch the image fill in row by row, ask about a picture, and
read what the loaded run was trained on and how it scored.

As the projects nano_emu follows ship theirs (Emu3's gradio_demo.py, LlamaGen's app.py), the page is Gradio, an
optional extra (`pip install -e ".[demo]"`): only `build_page` imports it. Everything the page does goes through
`Demo`, which needs no browser and no Gradio, so it is tested as plain Python (tests/test_demo.py):

    demo = Demo(load_tiny("out/tiny"), facts=run_facts("out/tiny"))
    for image, status in demo.draw("a red circle in the top left", seed=0): ...   # a partial image per row
    demo.ask("shape.png", "")                                                    # -> the caption

One process holds the model once. Its Pipeline keeps one Engine and so one KV cache, which a draw fills row by row
between its yields: two browser tabs drawing at once would write into each other's cache. So every draw and every
answer holds `Demo.lock` from its first forward to its last, and a second tab waits its turn (the same seed then
gives the same image, alone or not). A prompt the model cannot take -- a word outside a tiny model's vocabulary,
a prompt longer than its context -- is a line on the page, not a traceback.
"""

import json
import threading
import time
from pathlib import Path
from typing import Iterator

from PIL import Image

from .checkpoint import SETTINGS_KEY, read_meta
from .image import load_clip
from .pipeline import Pipeline
from .tiny import describe_tokenizer

# What the library raises for input that only shows once the model reads it (a word it does not know, a prompt
# longer than its context, a file that is not an image, a sampling value out of range); shown on the page. Any
# other exception is a bug and keeps its traceback (sample.py draws the same line).
USER_ERRORS = (ValueError, OSError)
SJD_WINDOW = 16              # the window the page's SJD checkbox turns on (sample.py --sjd's default)
ANSWER_TOKENS = 256          # the longest answer (sample.py --max-new-tokens' default)
NOT_DRAWN = (128, 128, 128)  # the rows still to come: grey, which no world draws on (shapes and scenes are black)
EMPTY_ANSWER = "(no words: the model ended its answer at once)"   # an empty box would look like nothing happened

# metrics.json's headline numbers, as (label, name); {split} is seen / heldout, {cfg} the run's own CFG. A world
# that runs beside another prefixes its names (world.World.prefix: "clip_" for a --video run's clips).
HEADLINES = (("VQ reconstruction PSNR", "vq_psnr_db"),
             ("drawings right (the world's checker)", "adherence_{split}_cfg{cfg}"),
             ("captions right", "caption_accuracy_{split}"),
             ("captions word for word", "caption_exact_{split}"),
             ("questions answered right", "qa_accuracy_{split}"),
             ("image NLL, nats per code", "nll_{split}"))
PREFIXES = (("", ""), ("clip_", "clips: "))


def headline_rows(metrics: dict, cfg: float) -> list[tuple[str, str, str]]:
    """(label, seen, held out) for every headline number the metrics hold ("" where a split has none)."""
    def shown(name: str, value) -> str:
        if value is None:
            return ""
        if name.endswith("psnr_db"):
            return f"{value:.2f} dB"
        return f"{value:.3f}" if name.startswith("nll") else f"{100 * value:.1f}%"

    rows = []
    for prefix, note in PREFIXES:
        for label, name in HEADLINES:
            if "{split}" not in name:
                if prefix + name in metrics:
                    rows.append((note + label, shown(name, metrics[prefix + name]), ""))
                continue
            values = [metrics.get(prefix + name.format(split=split, cfg=f"{cfg:g}")) for split in ("seen", "heldout")]
            if any(v is not None for v in values):
                rows.append((note + label + (f", CFG {cfg:g}" if "{cfg}" in name else ""),
                             *(shown(name, v) for v in values)))
    return rows


def run_facts(folder: str | Path) -> str:
    """What a tiny run's folder says about itself, as Markdown: the world it was trained on and how (the GPT's
    metadata: checkpoint.read_meta), and metrics.json's headline numbers."""
    folder = Path(folder)
    gpt, vq = read_meta(folder / "gpt.safetensors"), read_meta(folder / "vq.safetensors")
    settings = gpt.get(SETTINGS_KEY, {})
    world = gpt.get("world", "an unrecorded world")
    if settings.get("video"):
        world += " and clips of moving shapes"
    how = ", ".join(part for part in (f"preset {settings['preset']}" if "preset" in settings else "",
                                      "--quick" if settings.get("quick") else "",
                                      f"seed {settings['seed']}" if "seed" in settings else "") if part)
    sampling = gpt.get("sampling") or {}
    lines = [f"**{folder}**: trained on the world **{world}**" + (f" ({how})" if how else ""),
             f"- trained: the VQ {vq.get('step')} of {vq.get('steps')} steps, the GPT {gpt.get('step')} of "
             f"{gpt.get('steps')}"]   # the model's size, pictures and sampling: model_facts
    if "tokenizer" in gpt:
        lines.append(f"- captions: {describe_tokenizer(gpt['tokenizer'])}")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return "\n".join(lines + ["", "*No metrics.json: the run has not finished its evaluation.*"])
    metrics = json.loads(metrics_path.read_text())
    lines += ["", "| metrics.json | seen | held out |", "|---|---:|---:|"]
    lines += [f"| {label} | {seen} | {held} |"
              for label, seen, held in headline_rows(metrics, sampling.get("cfg_scale") or 1.0)]
    if "total_s" in metrics:
        lines += ["", f"trained and evaluated in {metrics['total_s']:.0f} s"]
    return "\n".join(lines)


def model_facts(pipe: Pipeline) -> str:
    """What any loaded model is, as Markdown: its size, the images it draws, its sampling defaults."""
    gpt, (h, w), factor = pipe.gpt.config, pipe.grid(), pipe.vq.cfg.spatial_factor
    params = pipe.gpt.num_params()
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    return (f"A {size}-parameter GPT ({gpt.n_layer} layers of width {gpt.dim}, on "
            f"{pipe.gpt.lm_head.weight.device} in {str(pipe.gpt.lm_head.weight.dtype).removeprefix('torch.')}); "
            f"draws {w * factor}x{h * factor} px as {h}x{w} codes of {pipe.vq.cfg.codebook_size}; defaults: CFG "
            f"{pipe.guidance.cfg_scale:g}, temperature {pipe.sampling.temperature:g}, top-k "
            f"{pipe.sampling.top_k or 'off'}")


class Demo:
    """A loaded Pipeline and the page's two actions, each under one lock (see the module docstring). pace: seconds
    each finished row stays on screen at least (the tiny models draw faster than the eye follows; 0: as fast as it
    draws)."""

    def __init__(self, pipe: Pipeline, facts: str = "", pace: float = 0.0):
        self.pipe, self.facts, self.pace = pipe, facts, pace
        self.lock = threading.Lock()

    @property
    def clips(self) -> bool:
        """Whether the model reads clips (its VQ has a time axis: a --video run)."""
        return self.pipe.vq.cfg.temporal_factor > 1

    def draw(self, prompt: str, negative: str | None = None, cfg: float | None = None,
             temperature: float | None = None, top_k: int | None = None, seed: int = 0,
             sjd: bool = False) -> Iterator[tuple[Image.Image | None, str]]:
        """Yields (image so far, status) after every finished row: the finished rows decoded onto a grey canvas of
        the full size, then the whole image with its tokens/s and forwards. A prompt the model cannot take yields
        (None, the reason) instead. top_k 0 or None: off; negative None: the checkpoint's negative prompt."""
        with self.lock:
            try:
                yield from self._draw(prompt, negative, cfg, temperature, top_k, seed, sjd)
            except USER_ERRORS as e:
                yield None, f"**Cannot draw this:** {e}"

    def _draw(self, prompt, negative, cfg, temperature, top_k, seed, sjd):
        pipe = self.pipe
        seed = int(seed or 0)   # a cleared seed box sends None
        if not 0 <= seed < 2**64:   # what torch.Generator takes
            raise ValueError(f"the seed must be in [0, 2**64), got {seed}")
        h, w = pipe.grid()
        factor = pipe.vq.cfg.spatial_factor
        window = SJD_WINDOW if sjd else 0
        engine = pipe.engine
        forwards = engine.forwards
        stream = pipe.draw_stream([prompt], seed=seed, negative_prompt=negative, cfg_scale=cfg,
                                  temperature=temperature, top_k=int(top_k) if top_k else None, sjd=window)
        sampling_s = 0.0   # time inside the sampler only: the previews and the pace are not the model's speed
        while True:
            start = time.perf_counter()
            rows = next(stream, None)
            sampling_s += time.perf_counter() - start
            if rows is None:
                break
            tokens = rows.tokens.size(1)
            if rows.rows_done == rows.rows_total:
                last = rows
                continue
            yield pipe.preview(rows, h, w, fill=NOT_DRAWN)[0], f"row {rows.rows_done} of {rows.rows_total}: {tokens / sampling_s:.0f} tokens/s so far"
            time.sleep(self.pace)
        guidance, sampling = pipe.options(cfg_scale=cfg, temperature=temperature, top_k=int(top_k) if top_k else None)
        tokens = last.tokens.size(1)
        yield pipe.decode(last.codes)[0], (
            f"done: {tokens} tokens in {sampling_s:.2f} s, **{tokens / sampling_s:.0f} tokens/s**, "
            f"{engine.forwards - forwards} forwards" + (f" (SJD, window {window})" if window else "") +
            f" | {w * factor}x{h * factor} px from {h}x{w} codes, seed {seed}, CFG {guidance.cfg_scale:g}, "
            f"temperature {sampling.temperature:g}, top-k {sampling.top_k or 'off'}"
            + (f" | its plan: *{last.plans[0]}*" if last.plans else ""))   # a model trained with --plan wrote it

    def ask(self, image: str | Path | Image.Image | None, question: str = "", clip: str | Path | None = None) -> str:
        """The model's answer about an image (or, for a --video run, a clip: an animated GIF); an empty question
        asks for a caption. A file it cannot read, or nothing given, is answered with the reason."""
        if image is None and clip is None:
            return "Upload an image first" + (" (or a clip)" if self.clips else "") + "."
        with self.lock:
            try:
                if clip is not None and len(frames := load_clip(clip)) > 1:
                    text = self.pipe.answer_clip(frames, question, max_new_tokens=ANSWER_TOKENS)
                else:
                    text = self.pipe.answer(image if clip is None else frames[0], question,
                                            max_new_tokens=ANSWER_TOKENS)
            except USER_ERRORS as e:
                return f"Cannot answer: {e}"
        return text or EMPTY_ANSWER


# the page's own look: pixel art stays pixel art when a 64x64 image is shown at 320x320, and no web fonts (the
# default theme fetches Google's, which a machine without internet waits for)
CSS = "#drawn img, #ask-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def build_page(demo: Demo, title: str):
    """The Gradio page (Blocks) of a Demo: a Draw tab, an Ask tab, and the run's facts above them."""
    import gradio as gr

    pipe = demo.pipe
    class_conditional = hasattr(pipe.tokenizer, "first_class_id")   # LlamaGen: a class name or index, no negative
    with gr.Blocks(title=f"nano_emu: {title}", analytics_enabled=False) as page:
        gr.Markdown(f"## nano_emu: {title}")
        with gr.Tab("Draw"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="ImageNet class (name or index)" if class_conditional else "prompt",
                                        lines=1, elem_id="prompt")
                    negative = gr.Textbox(label="negative prompt (CFG's unconditional branch)",
                                          value=pipe.negative_prompt, visible=not class_conditional,
                                          elem_id="negative")
                    with gr.Row():
                        cfg = gr.Slider(0.0, 10.0, value=pipe.guidance.cfg_scale, step=0.5, label="CFG (1 = off)",
                                        elem_id="cfg")
                        temperature = gr.Slider(0.0, 2.0, value=pipe.sampling.temperature, step=0.05,
                                                label="temperature (0 = greedy)", elem_id="temperature")
                    with gr.Row():
                        top_k = gr.Number(value=pipe.sampling.top_k or 0, precision=0, minimum=0,
                                          label="top-k (0 = off)", elem_id="top-k")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                        sjd = gr.Checkbox(label=f"speculative Jacobi decoding (window {SJD_WINDOW})",
                                          elem_id="sjd")
                    draw = gr.Button("Draw", variant="primary", elem_id="draw")
                with gr.Column():
                    drawn = gr.Image(label="drawn row by row", type="pil", format="png", height=320,
                                     interactive=False, elem_id="drawn")
                    status = gr.Markdown(elem_id="draw-status")
            inputs = [prompt, negative, cfg, temperature, top_k, seed, sjd]
            draw.click(demo.draw, inputs, [drawn, status])
            prompt.submit(demo.draw, inputs, [drawn, status])
        with gr.Tab("Ask", visible=not class_conditional):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="image (drop one here)", type="filepath", height=320,
                                     sources=["upload", "clipboard"], elem_id="ask-image")
                    clip = gr.File(label="or a clip (an animated GIF)", file_types=[".gif"], visible=demo.clips,
                                   elem_id="ask-clip")
                    question = gr.Textbox(label="question (empty: a caption)", elem_id="question")
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                with gr.Column():
                    answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
            gr.on([ask.click, question.submit], demo.ask, [image, question, clip], answer)
        with gr.Accordion("This model", open=True):
            gr.Markdown(demo.facts or title, elem_id="facts")
    return page


def theme():
    """Gradio's default theme on the system's fonts (see CSS)."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
