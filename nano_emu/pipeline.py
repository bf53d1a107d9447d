"""A loaded model and the two things people do with it: draw an image (or a clip) from text, and answer about one.

`Pipeline` bundles the GPT, the VQ, the text tokenizer and the token layout, plus the prompt conventions of the
checkpoint (Emu3-Gen's positive suffix and negative prompt, Emu3-Chat's template, the image area). It only
strings together layout.py (prompts), sampler.py (generation) and vq.py (pixels); it adds no math of its own.

    pipe = load_tiny("out/tiny")                 # tiny.py: what train_tiny.py wrote (or nano_emu.load_emu3(...))
    image = pipe.draw(["a red circle in the top left"], cfg_scale=3.0, seed=0)[0]
    for rows in pipe.draw_stream([...]): ...     # watch it fill in row by row
    text = pipe.answer(image, "")                # the tiny model captions; Emu3-Chat answers the question
    clip = pipe.draw(["a red circle moving left"], frames=8)[0]   # 8 PIL frames (a --video tiny checkpoint)
    text = pipe.answer_clip(clip)                # "a red circle moving left"
    pipe.compile, pipe.sjd = True, 16            # speed options: a compiled decode step, speculative Jacobi decoding
    pipe.guidance, pipe.sampling                 # the checkpoint's defaults (sampler.Guidance, sampler.Sampling)
    pipe.release()                               # free the KV cache it keeps between calls

A clip goes through the same calls as an image. `frames` always counts pixel frames (None: an image); inside,
t = frames / the VQ's temporal_factor counts code frames (1 for an image). The prompt's meta text says "t*h*w",
the grid constraint closes every code frame with EOF, and the VQ's causal temporal decoder turns the t code
frames back into frames. (A clip of one code frame is written as an image, "h*w": to the VQ an image is a clip
of temporal_factor identical frames.)
"""

import math
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .engine import Engine
from .gpt import GPT
from .image import MAX_ASPECT_RATIO, image_to_tensor, load_clip, tensor_to_image
from .layout import Layout
from .sampler import GREEDY, Guidance, Rows, Sampling, generate_image_stream, generate_text, plain_decode
from .sjd import jacobi_decode
from .vq import VQModel

GUIDANCE_OPTIONS = tuple(f.name for f in fields(Guidance))
SAMPLING_OPTIONS = tuple(f.name for f in fields(Sampling))


@dataclass
class Pipeline:
    gpt: GPT
    vq: VQModel
    tokenizer: object
    layout: Layout
    image_area: int                     # pixels of a generated image (Emu3-Gen: 720 * 720)
    prompt_suffix: str = ""             # appended to every text-to-image prompt (Emu3-Gen's demo suffix)
    negative_prompt: str = ""           # CFG's unconditional branch ("" = the null caption the toys trained with)
    chat_template: str = "{image}{question}"
    resize: dict | None = None          # keyword limits for image.image_to_tensor (None: the released processor's)
    max_aspect_ratio: float = MAX_ASPECT_RATIO   # the widest ratio it draws (Emu3: its released processor's limit);
    #                                              1 for models trained on squares only (tiny, LlamaGen, Chameleon)
    guidance: Guidance = Guidance(cfg_scale=3.0)   # the checkpoint's defaults (Emu3-Gen: CFG 3.0 on log-probs)
    sampling: Sampling = Sampling()                # (Emu3-Gen: top_k 2048 at temperature 1)
    compile: bool = False               # torch.compile the decode step (speed only: the same tokens)
    sjd: int = 0                        # speculative Jacobi decoding window for draw (0: off; sjd.py)
    sjd_coupled: bool = False           # with sjd: coupled draft redraws (MC-SJD, sjd.couple); still exact
    _engine: Engine | None = field(default=None, init=False, repr=False)   # owns the KV cache between calls

    @property
    def engine(self) -> Engine:
        """The GPT's engine: its KV cache is allocated by the first draw/answer and reused by the next ones."""
        if self._engine is None or self._engine.model is not self.gpt or self._engine.compile != self.compile:
            self._engine = Engine(self.gpt, compile=self.compile)
        return self._engine

    def release(self) -> None:
        """Free the KV cache kept between calls (the next call allocates a new one)."""
        if self._engine is not None:
            self._engine.release()

    def options(self, **given) -> tuple[Guidance, Sampling]:
        """The checkpoint's Guidance and Sampling with the given fields replaced (None: keep the default), e.g.
        options(cfg_scale=2, temperature=0). Both check their values, so nonsense fails here, by name."""
        unknown = sorted(set(given) - set(GUIDANCE_OPTIONS) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(GUIDANCE_OPTIONS + SAMPLING_OPTIONS)}")
        given = {k: v for k, v in given.items() if v is not None}
        return (replace(self.guidance, **{k: v for k, v in given.items() if k in GUIDANCE_OPTIONS}),
                replace(self.sampling, **{k: v for k, v in given.items() if k in SAMPLING_OPTIONS}))

    def grid(self, ratio: str = "1:1") -> tuple[int, int]:
        """Token grid (h, w) for an aspect ratio "W:H" at the checkpoint's image area (Emu3's rule: the
        image keeps its area, each side a whole number of VQ codes, Python's rounding). A ratio wider than
        max_aspect_ratio is refused: a model trained on squares draws smeared blobs on other grids."""
        try:
            width, height = (float(x) for x in ratio.split(":"))
        except ValueError:
            raise ValueError(f"ratio must look like '16:9' (width:height), got {ratio!r}") from None
        if not all(math.isfinite(side) and side > 0 for side in (width, height)):
            raise ValueError(f"ratio must be two positive numbers width:height, got {ratio!r}")
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect_ratio * (1 + 1e-9):
            if self.max_aspect_ratio == 1:
                side = math.isqrt(self.image_area)
                raise ValueError(f"ratio {ratio}: this model draws square images only (it was trained on {side}x"
                                 f"{side} squares), so other ratios would give grids it never saw; use 1:1")
            raise ValueError(f"ratio {ratio} is {aspect:.3g}:1, wider than the {self.max_aspect_ratio:g}:1 this "
                             f"model draws")
        scale = math.sqrt(self.image_area / (width * height))
        factor = self.vq.cfg.spatial_factor
        return max(1, round(height * scale / factor)), max(1, round(width * scale / factor))

    def code_frames(self, frames: int | None) -> int:
        """Pixel frames of a clip -> t, the code frames (the VQ packs temporal_factor frames into one); 1 for an
        image (frames None)."""
        if frames is None:
            return 1
        factor = self.vq.cfg.temporal_factor
        if factor == 1:   # train_tiny.py drops the time axis for image-only runs; only --video checkpoints have one
            raise ValueError("this checkpoint's VQ has no time axis (temporal_factor=1): it draws and reads images, "
                             "not clips (train with --video for clips)")
        if frames < 1 or frames % factor:
            raise ValueError(f"a clip needs a positive multiple of {factor} frames (the VQ's temporal factor: "
                             f"{factor} frames per code frame), got {frames}")
        return frames // factor

    def draw_stream(self, prompts: list[str], ratio: str = "1:1", seed: int = 0, negative_prompt: str | None = None,
                    frames: int | None = None, keep: torch.Tensor | None = None, constrain: bool = True,
                    sjd: int | None = None, record: bool = False, plans: list[str] | None = None,
                    **options) -> Iterator[Rows]:
        """Yields sampler.Rows after every finished row (last: the whole image). Each prompt gets the
        checkpoint's suffix; the negative prompt (default: the checkpoint's) is the unconditional branch.
        options: fields of sampler.Guidance (cfg_scale, cfg_on, cfg_interval, cdk_k, ...) and sampler.Sampling
        (temperature, top_k, top_p); those left out or None take the checkpoint's defaults. sjd None takes
        self.sjd. frames: draw clips of that many frames instead (a multiple of the VQ's temporal factor); Rows
        then stacks the code frames' rows. keep: (B, r, w) codes of the first rows (image completion).
        A model whose layout has a plan segment first writes each prompt's plan (write_plans), then draws from
        caption and plan; `plans` gives them instead. Rows.plans holds them. record: Rows.logprobs (sampler)."""
        h, w = self.grid(ratio)
        t = self.code_frames(frames)
        guidance, sampling = self.options(**options)
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        generator = torch.Generator(self.gpt.lm_head.weight.device).manual_seed(seed)
        if plans is not None and (not self.layout.has_plans or len(plans) != len(prompts)):
            raise ValueError("plans go with a model trained with plans (--plan), one per prompt")
        if self.layout.has_plans and plans is None:
            plans = self.write_plans(prompts, sampling, generator)
        cond = [self.layout.generation_prompt(p + self.prompt_suffix, h, w, self.tokenizer, t, plan=plan)
                for p, plan in zip(prompts, plans or [None] * len(prompts))]
        uncond = [self.layout.generation_prompt(negative, h, w, self.tokenizer, t)] * len(prompts)
        window = self.sjd if sjd is None else sjd
        loop = partial(jacobi_decode, window=window, coupled=self.sjd_coupled) if window else plain_decode
        for rows in generate_image_stream(self.gpt, self.layout, cond, h, w, t, negative_prompts=uncond,
                                          guidance=guidance, sampling=sampling, generator=generator,
                                          constrain=constrain, keep=keep, engine=self.engine, loop=loop, record=record):
            yield rows._replace(plans=plans)

    def write_plans(self, prompts: list[str], sampling: Sampling, generator: torch.Generator | None = None,
                    max_new_tokens: int = 48) -> list[str]:
        """The plan the model writes for each prompt (layout.py's plan segment): BOS caption BOP, then words until
        EOP, drawn with `sampling` (text only: no marker, no visual token, no EOS)."""
        allowed = self.layout.plan_mask(self.gpt.config.vocab_size, self.gpt.lm_head.weight.device)
        prompts = [self.layout.plan_prompt(p + self.prompt_suffix, self.tokenizer) for p in prompts]
        written = generate_text(self.gpt, self.layout, prompts, max_new_tokens, sampling=sampling,
                                generator=generator, allowed=allowed, engine=self.engine, stop=self.layout.eop)
        return [self.tokenizer.decode(ids) for ids in written]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, frames: int | None = None) -> list[Image.Image] | list[list[Image.Image]]:
        """Codes (B, h, w) -> PIL images (the VQ may run in another dtype than the GPT, as Emu3's demos do);
        clip codes (B, t, h, w) -> clips, each a list of t * temporal_factor PIL frames. With `frames` (a clip's
        pixel frames), codes may also be Rows.codes of a finished clip, (B, t * h, w): the code frames' rows
        one after another."""
        if frames is not None and codes.dim() == 3:
            codes = codes.view(codes.size(0), self.code_frames(frames), -1, codes.size(-1))   # (B, t, h, w)
        pixels = self.vq.decode(codes.to(next(self.vq.parameters()).device)).float()   # (B, [T,] 3, H, W)
        if codes.dim() == 4:
            return [[tensor_to_image(frame) for frame in clip] for clip in pixels]
        return [tensor_to_image(p) for p in pixels]

    def preview(self, rows: Rows, h: int, w: int, fill="black") -> list[Image.Image]:
        """A drawing in progress (draw_stream's Rows): its finished rows decoded onto a canvas the size of the
        whole h x w-code picture, the rest `fill`. What sample.py --progress and the demo page show."""
        factor, canvases = self.vq.cfg.spatial_factor, []
        for image in self.decode(rows.codes):
            canvases.append(Image.new("RGB", (w * factor, h * factor), fill))
            canvases[-1].paste(image, (0, 0))
        return canvases

    def draw(self, prompts: list[str], batch_size: int | None = None, seed: int = 0, frames: int | None = None,
             **kwargs) -> list[Image.Image] | list[list[Image.Image]]:
        """One image per prompt, or with `frames` one clip (a list of PIL frames) per prompt. batch_size splits
        long lists into batches (batch k is drawn with seed + k)."""
        batch_size = batch_size or len(prompts)
        images = []
        for k, start in enumerate(range(0, len(prompts), batch_size)):
            for rows in self.draw_stream(prompts[start:start + batch_size], seed=seed + k, frames=frames, **kwargs):
                pass
            images += self.decode(rows.codes, frames)
        return images

    @torch.no_grad()
    def complete(self, image: Image.Image | str | Path, keep_rows: int, prompts: list[str] | None = None,
                 seed: int = 0, **kwargs) -> list[Image.Image]:
        """Image completion: the image's first keep_rows rows of codes are kept and the model draws the rest, once
        per prompt (default: one, the empty caption), with the same sampler as draw (its `keep` option). The image
        is brought to the pipeline's square image size as answer() does."""
        device, dtype = next(self.vq.parameters()).device, next(self.vq.parameters()).dtype
        pixels = image_to_tensor(image, factor=self.vq.cfg.spatial_factor, **(self.resize or {}))
        codes = self.vq.encode(pixels[None].to(device, dtype)).cpu()                   # (1, h, w)
        h, w = self.grid()
        if codes.shape[1:] != (h, w):
            raise ValueError(f"the image gives {codes.shape[1]}x{codes.shape[2]} codes, this model draws {h}x{w}")
        if not 0 <= keep_rows < h:
            raise ValueError(f"keep_rows must be in [0, {h}) for a {h}-row image, got {keep_rows}")
        prompts = prompts or [""]
        for rows in self.draw_stream(prompts, seed=seed, keep=codes[:, :keep_rows].expand(len(prompts), -1, -1),
                                     **kwargs):
            pass
        return self.decode(rows.codes)

    @torch.no_grad()
    def answer(self, image: Image.Image | str | Path | np.ndarray | list, question: str = "",
               max_new_tokens: int = 256, **sampling) -> str | list[str]:
        """Image understanding: the image block goes into the chat template, the answer is generated (greedy by
        default, as Emu3-Chat's demo) until EOS, under Layout.answer_mask (text only). `image` is a PIL image, a
        path or a uint8 (H, W, 3) array; a list of them is answered as one batch and gives a list of answers."""
        images = image if isinstance(image, list) else [image]
        texts = self._answer([self._pixels(x) for x in images], question, 256, max_new_tokens, sampling)
        return texts if isinstance(image, list) else texts[0]

    @torch.no_grad()
    def answer_logprob(self, image: Image.Image | str | Path | np.ndarray | list, answer: str | list[str],
                       question: str = "") -> float | list[float]:
        """How likely the model finds `answer` as its answer about the image: log p(answer EOS | image, question),
        teacher-forced under the mask answers are generated under. A graded reading where `answer` gives only the
        greedy one (posttrain.best_of_k ranks drawings by it). A list of images takes one answer or a list."""
        images = image if isinstance(image, list) else [image]
        answers = answer if isinstance(answer, list) else [answer] * len(images)
        if len(answers) != len(images):
            raise ValueError(f"{len(images)} images but {len(answers)} answers: give one answer, or one per image")
        prompts = self._understanding_prompts([self._pixels(x) for x in images], question, 256)
        rows = [(prompt, self.tokenizer.encode(text) + [self.layout.eos]) for prompt, text in zip(prompts, answers)]
        longest = max(len(p) + len(a) for p, a in rows)
        if longest - 1 > self.gpt.config.max_seq_len:
            raise ValueError(f"an image's prompt and answer take {longest - 1} tokens, more than the model's context "
                             f"of {self.gpt.config.max_seq_len}: shorten the answer or the question")
        device = self.gpt.lm_head.weight.device
        allowed = self.layout.answer_mask(self.gpt.config.vocab_size, device)
        scores = []
        for i in range(0, len(rows), 64):
            batch = rows[i:i + 64]
            ids = torch.full((len(batch), max(len(p) + len(a) for p, a in batch)), self.layout.pad, dtype=torch.long)
            scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
            for j, (prompt, text) in enumerate(batch):   # right padding: causal attention never looks ahead at it
                ids[j, :len(prompt) + len(text)] = torch.tensor(prompt + text)
                scored[j, len(prompt) - 1:len(prompt) + len(text) - 1] = True
            ids = ids.to(device)
            logits = self.gpt(ids[:, :-1]).float().masked_fill(~allowed, float("-inf"))
            logprobs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            scores += logprobs.where(scored.to(device), 0.0).sum(1).tolist()
        return scores if isinstance(image, list) else scores[0]

    @torch.no_grad()
    def answer_clip(self, clip: str | Path | np.ndarray | list, question: str = "", max_new_tokens: int = 256,
                    **sampling) -> str | list[str]:
        """Video understanding, as `answer`: the clip's block ("t*h*w", EOF after every code frame) goes into the
        template. A clip is a GIF or a folder of frames (a path), a uint8 array (T, H, W, 3) or a list of PIL
        frames, T a multiple of the VQ's temporal factor; a list of clips (or a (N, T, H, W, 3) array) is answered
        as one batch and gives a list of answers."""
        one = isinstance(clip, (str, Path)) or (isinstance(clip, np.ndarray) and clip.ndim == 4) or (
            isinstance(clip, list) and len(clip) > 0 and isinstance(clip[0], Image.Image))
        clips = [clip] if one else list(clip)
        pixels = []
        for clip_or_path in clips:
            frames = load_clip(clip_or_path) if isinstance(clip_or_path, (str, Path)) else clip_or_path
            self.code_frames(len(frames))   # refuses a VQ without a time axis and a length it cannot encode
            pixels.append(torch.stack([self._pixels(frame) for frame in frames]))   # (T, 3, H, W)
            self._check_clip_fits(pixels[-1], question, max_new_tokens)
        texts = self._answer(pixels, question, 32, max_new_tokens, sampling)   # 32 clips of 8 ~ 256 images
        return texts[0] if one else texts

    def _check_clip_fits(self, clip: torch.Tensor, question: str, max_new_tokens: int) -> None:
        """A clip's prompt grows by a code frame every temporal_factor frames: refuse one that the context cannot
        hold with the answer, saying how many frames it can (the engine would only say "shorten the prompt")."""
        factor, spatial = self.vq.cfg.temporal_factor, self.vq.cfg.spatial_factor
        h, w, context = clip.shape[-2] // spatial, clip.shape[-1] // spatial, self.gpt.config.max_seq_len

        def prompt_length(t: int) -> int:
            codes = torch.zeros(t, h, w, dtype=torch.long)
            return len(self.layout.understanding_prompt(codes, question, self.tokenizer, self.chat_template))

        t = clip.shape[0] // factor
        if prompt_length(t) + max_new_tokens <= context:
            return
        fit = 0
        while prompt_length(fit + 1) + max_new_tokens <= context:
            fit += 1
        raise ValueError(f"the clip is too long for this model: its {clip.shape[0]} frames are {t} code frames, a "
                         f"prompt of {prompt_length(t)} tokens, which with max_new_tokens={max_new_tokens} for the "
                         f"answer exceed its context of {context} tokens; it holds clips of at most "
                         f"{fit * factor} frames" + ("" if fit else " (lower max_new_tokens)"))

    def _pixels(self, image: Image.Image | str | Path | np.ndarray) -> torch.Tensor:
        """One image (PIL, path or uint8 (H, W, 3)) -> pixels (3, H, W) in [-1, 1], as the checkpoint resizes."""
        return image_to_tensor(Image.fromarray(image) if isinstance(image, np.ndarray) else image,
                               factor=self.vq.cfg.spatial_factor, **(self.resize or {}))

    def _answer(self, pixels: list[torch.Tensor], question: str, chunk: int, max_new_tokens: int,
                sampling: dict) -> list[str]:
        """Images (3, H, W) or clips (T, 3, H, W) -> VQ codes -> understanding prompts -> one batch of answers."""
        prompts = self._understanding_prompts(pixels, question, chunk)
        allowed = self.layout.answer_mask(self.gpt.config.vocab_size, self.gpt.lm_head.weight.device)
        unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown answer option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(SAMPLING_OPTIONS)} (greedy by default)")
        sampling = replace(GREEDY, **{k: v for k, v in sampling.items() if v is not None})
        answers = generate_text(self.gpt, self.layout, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                allowed=allowed, engine=self.engine)
        return [self.tokenizer.decode(a) for a in answers]

    def _understanding_prompts(self, pixels: list[torch.Tensor], question: str, chunk: int) -> list[list[int]]:
        """Images (3, H, W) or clips (T, 3, H, W) -> VQ codes -> the understanding prompt of each."""
        device, dtype = next(self.vq.parameters()).device, next(self.vq.parameters()).dtype
        prompts = []
        for i in range(0, len(pixels), chunk):   # same-size inputs (the toys) encode `chunk` at a time
            part = pixels[i:i + chunk]
            batch = [torch.stack(part)] if len({p.shape for p in part}) == 1 else [p[None] for p in part]
            for x in batch:
                for codes in self.vq.encode(x.to(device, dtype)).cpu():   # (h, w) or (t, h, w)
                    prompts.append(self.layout.understanding_prompt(codes, question, self.tokenizer,
                                                                    self.chat_template))
        return prompts
