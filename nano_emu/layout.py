"""One token string for text, images and video: Emu3's layout.

Emu3 ("Emu3: Next-Token Prediction is All You Need", Wang et al. 2024) gives text, images and video one
vocabulary and one sequence. Text is text tokens; an image of h x w VQ codes is written as

    BOI "h*w" IMG  v v .. v EOL  v v .. v EOL  ...  (h rows)  EOF EOI

where v = first_visual + code, EOL closes each row, EOF closes a frame and the meta text "h*w" (plain text,
tokenized by the text tokenizer, so Emu3's tokenizer spells "90*90" digit by digit) tells the reader the grid
before it starts. A video of t latent frames repeats the rows per frame with EOF after each and says "t*h*w".

    generation prompt ('G'):    BOS caption BOI "h*w" IMG      -> the model continues with the rows
    understanding prompt ('U'): BOS [template text] image block [question ...]  -> the model answers in text

This module writes such strings (`encode`, `image_block`, the two prompts) and reads them back (`decode`). A
malformed string (row of the wrong length, a missing marker, a text token inside a row) raises LayoutError
saying where and what; it is repaired only when the caller asks (`repair=True`), never silently.
`grid_schedule` lists what may follow IMG at each offset; the sampler turns it into its constraint table.

A plan before the picture (optional, tiny layouts made with plan=True): between the caption and the image block
the string may carry the picture's layout in words, written by the model before it draws (a generation
chain-of-thought; plans.py writes and reads the words):

    BOS caption BOP "small red circle at top left then large blue square at bottom right" EOP BOI "h*w" IMG ...
    plan prompt: BOS caption BOP  -> the model writes the plan and EOP; the image prompt then continues with BOI

LlamaGen's class-to-image string is the bare case (`Layout.llamagen()`): the condition token, then the h*w codes in
raster order with no markers at all (its roles other than `pad` are None), so the grid size is the model's own.

Chameleon / Anole (`Layout.chameleon()`) sit between the two: an image is `BOI v v .. v EOI` with exactly h*w codes
and no row, frame or size markers (no IMG, EOL, EOF), so the grid is fixed by the layout (`image_grid`, 32x32 for
512 px) and a block is read back by counting: h*w visual tokens, then EOI, or a LayoutError saying where. Image code
i is BPE id first_visual + i (4 + i in the release; chameleon.py checks the tokenizer's IMGIMG names agree).
    generation prompt:    BOS caption BOI            -> the model writes h*w codes, then EOI
    understanding prompt: BOS question BOI codes EOI [SEP]  -> the model answers in text
"""

import re
from dataclasses import dataclass

import torch

VISUAL = -1   # wildcard in a grid schedule: "any visual token may stand here"

EMU3_CHAT_TEMPLATE = "You are a helpful assistant. USER: {image}{question}. ASSISTANT:"   # Emu3-Chat, mode 'U'


class LayoutError(ValueError):
    """A token sequence that does not follow the layout."""


class Plan(str):
    """Text that a token string writes between BOP and EOP (the picture's plan), not as caption text."""


@dataclass(frozen=True)
class Layout:
    pad: int
    bos: int | None    # None (LlamaGen): the layout has no such token
    eos: int | None
    img: int | None    # starts the vision tokens ("<|image token|>", the paper's SOT)
    boi: int | None    # begins an image block ("<|image start|>", SOV)
    eoi: int | None    # ends it ("<|image end|>", EOV)
    eol: int | None    # end of a row
    eof: int | None    # end of a (latent) frame
    first_visual: int  # visual token id = first_visual + VQ code
    codebook_size: int
    image_grid: tuple[int, int] | None = None   # Chameleon: every block is this (h, w) grid (no size text in it)
    # more ids an answer may never hold (Chameleon: <unk>, the <reserved...> block, every "<...>" special but EOS,
    # as its reference text decoder forbids them); empty for the others, so older saved layouts still load
    answer_forbidden: tuple[int, ...] = ()
    bop: int | None = None   # begins a plan (tiny layouts with plans only; None: the layout has no plan segment)
    eop: int | None = None   # ends it

    @property
    def vocab_size(self) -> int:
        return self.first_visual + self.codebook_size

    # The three families differ by which roles exist; these name the switches every method below reads:
    #                      has_row_markers  fixed_grid  condition_only
    #   Emu3 / tiny              yes            no           no       BOS text BOI "h*w" IMG rows+EOL EOF EOI
    #   Chameleon / Anole        no             yes          no       BOS text BOI codes EOI
    #   LlamaGen c2i             no             no           yes      class-token codes

    @property
    def has_row_markers(self) -> bool:
        """Emu3: rows end with EOL, frames with EOF, and the block's meta text says its grid."""
        return self.eol is not None

    @property
    def fixed_grid(self) -> bool:
        """Chameleon: every image block is `image_grid` codes between BOI and EOI, with no size text."""
        return self.image_grid is not None

    @property
    def condition_only(self) -> bool:
        """LlamaGen: the prompt is the condition tokens alone, the codes follow with no markers at all."""
        return self.bos is None

    @classmethod
    def emu3(cls) -> "Layout":
        """The released Emu3 ids (QWen BPE 0..151642, then specials, then 32768 visual tokens)."""
        return cls(pad=151643, bos=151849, eos=151850, img=151851, boi=151852, eoi=151853,
                   eol=151846, eof=151847, first_visual=151854, codebook_size=32768)

    @classmethod
    def tiny(cls, codebook_size: int = 1024, text_vocab: int = 256, plan: bool = False) -> "Layout":
        """Toy models: text ids 0..text_vocab-1 (256 UTF-8 bytes for tokenizer.ByteTokenizer, or a
        WordTokenizer's words), then 8 specials (10 with a plan segment: BOP, EOP), then the codes."""
        n, plans = text_vocab, 2 if plan else 0
        return cls(pad=n, bos=n + 1, eos=n + 2, img=n + 3, boi=n + 4, eoi=n + 5, eol=n + 6, eof=n + 7,
                   first_visual=n + 8 + plans, codebook_size=codebook_size,
                   **(dict(bop=n + 8, eop=n + 9) if plan else {}))

    @classmethod
    def llamagen(cls, codebook_size: int = 16384) -> "Layout":
        """LlamaGen c2i: codes are the token ids; the class token (GPT input id codebook_size + class) is the whole
        prompt, so prompts never need padding (pad is the first class id, never fed)."""
        return cls(pad=codebook_size, bos=None, eos=None, img=None, boi=None, eoi=None, eol=None, eof=None,
                   first_visual=0, codebook_size=codebook_size)

    @classmethod
    def chameleon(cls, bos: int = 0, pad: int = 1, eos: int = 2, eoi: int = 8196, boi: int = 8197,
                  first_visual: int = 4, codebook_size: int = 8192, image_grid: tuple[int, int] = (32, 32)) -> "Layout":
        """Chameleon's released ids: <s> 0, <pad> 1, </s> 2, image codes 4..8195, <eoss> 8196 ends an image and
        <racm3:break> 8197 begins one; 512 px images are 32x32 codes. chameleon.py reads them off the tokenizer."""
        return cls(pad=pad, bos=bos, eos=eos, img=None, boi=boi, eoi=eoi, eol=None, eof=None,
                   first_visual=first_visual, codebook_size=codebook_size, image_grid=tuple(image_grid))

    # --- naming and classifying tokens ---------------------------------------------------------------------

    def is_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens >= self.first_visual) & (tokens < self.first_visual + self.codebook_size)

    @property
    def has_plans(self) -> bool:
        return self.bop is not None

    def is_special(self, token: int) -> bool:
        return token is not None and token in (self.pad, self.bos, self.eos, self.img, self.boi, self.eoi, self.eol,
                                               self.eof, self.bop, self.eop)

    def answer_mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """(vocab_size,) bool: what an answer about an image may contain -- text and EOS, never a visual token or
        an image/padding marker. The one mask every caption and chat answer is generated under."""
        allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
        allowed[self.first_visual:self.first_visual + self.codebook_size] = False
        allowed[[t for t in (self.pad, self.bos, self.img, self.boi, self.eoi, self.eol, self.eof, self.bop, self.eop)
                 if t is not None]] = False
        allowed[[t for t in self.answer_forbidden if t < vocab_size]] = False
        return allowed

    def plan_mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """(vocab_size,) bool: what a plan's words may be (the answer mask's text) and EOP, which ends it; no EOS.
        The one mask plans are written under (Pipeline.write_plans) and scored under (posttrain.token_logprobs)."""
        allowed = self.answer_mask(vocab_size, device)
        allowed[self.eos], allowed[self.eop] = False, True
        return allowed

    def name(self, token: int) -> str:
        """A readable name for error messages."""
        for role in ("pad", "bos", "eos", "img", "boi", "eoi", "eol", "eof", "bop", "eop"):
            if token == getattr(self, role):
                return role.upper()
        if self.first_visual <= token < self.vocab_size:
            return f"visual token (code {token - self.first_visual})"
        return f"text token {token}"

    # --- writing -------------------------------------------------------------------------------------------

    def image_block(self, codes: torch.Tensor, tokenizer) -> list[int]:
        """codes (h, w) for an image or (t, h, w) for a video -> BOI meta IMG rows.. EOF .. EOI."""
        if codes.dim() not in (2, 3) or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor of shape (h, w) or (t, h, w), got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        if self.fixed_grid:   # Chameleon: BOI, the codes in raster order, EOI; no size text
            if tuple(codes.shape) != tuple(self.image_grid):
                raise ValueError(f"this layout's image blocks are {self.image_grid[0]}x{self.image_grid[1]} codes "
                                 f"(no size marker tells a reader otherwise), got codes of shape {tuple(codes.shape)}")
            return [self.boi, *(codes.flatten() + self.first_visual).tolist(), self.eoi]
        meta = "*".join(str(n) for n in codes.shape)           # "h*w" or "t*h*w"
        code_frames = codes if codes.dim() == 3 else codes[None]     # (t, h, w)
        t, h, w = code_frames.shape
        grid = torch.cat([code_frames + self.first_visual,
                          torch.full((t, h, 1), self.eol, dtype=codes.dtype)], dim=2)   # (t, h, w+1): EOL column
        grid = torch.cat([grid.reshape(t, h * (w + 1)),
                          torch.full((t, 1), self.eof, dtype=codes.dtype)], dim=1)     # (t, h*(w+1)+1): + EOF
        return [self.boi, *tokenizer.encode(meta), self.img, *grid.flatten().tolist(), self.eoi]

    def encode(self, parts: list, tokenizer, bos: bool = True, eos: bool = False) -> list[int]:
        """parts: strings (text), Plans (written between BOP and EOP) and integer tensors (image/video codes)."""
        tokens = [self.bos] if bos else []
        for part in parts:
            if isinstance(part, Plan):
                tokens += self.plan_block(part, tokenizer)
            else:
                tokens += tokenizer.encode(part) if isinstance(part, str) else self.image_block(part, tokenizer)
        return tokens + [self.eos] if eos else tokens

    def plan_block(self, plan: str, tokenizer) -> list[int]:
        """BOP plan EOP; refused by a layout without a plan segment."""
        if not self.has_plans:
            raise ValueError("this layout has no plan segment (a tiny run trained with --plan has one)")
        return [self.bop, *tokenizer.encode(plan), self.eop]

    def plan_prompt(self, text: str, tokenizer) -> list[int]:
        """BOS caption BOP: the model writes the plan, then EOP."""
        return [self.bos, *tokenizer.encode(text), *self.plan_block("", tokenizer)[:-1]]

    def generation_prompt(self, text: str, h: int, w: int, tokenizer, t: int = 1, plan: str | None = None) -> list[int]:
        """Emu3's mode 'G': BOS text BOI "h*w" IMG (or "t*h*w" for a clip of t > 1 code frames); the model
        writes the rows. plan: BOP plan EOP between the text and BOI (a layout with plans)."""
        if self.fixed_grid:   # Chameleon: the caption, then BOI; the grid is the layout's
            if (h, w) != tuple(self.image_grid) or t != 1:
                raise ValueError(f"this layout draws {self.image_grid[0]}x{self.image_grid[1]} images only, not "
                                 f"{f'{t}*' if t != 1 else ''}{h}x{w}")
            return [self.bos, *tokenizer.encode(text), self.boi]
        if self.condition_only:   # LlamaGen: the condition alone; the grid size is fixed by the model
            return tokenizer.encode(text)
        meta = f"{h}*{w}" if t == 1 else f"{t}*{h}*{w}"
        planned = self.plan_block(plan, tokenizer) if plan is not None else []
        return [self.bos, *tokenizer.encode(text), *planned, self.boi, *tokenizer.encode(meta), self.img]

    def understanding_prompt(self, codes: torch.Tensor, question: str, tokenizer,
                             template: str = "{image}{question}") -> list[int]:
        """Emu3's mode 'U': BOS, the template with the image block at {image} and the question at {question}.
        Emu3-Chat uses EMU3_CHAT_TEMPLATE; the tiny models see just the image and write the caption."""
        before, after = template.split("{image}")
        return [self.bos, *tokenizer.encode(before.format(question=question)), *self.image_block(codes, tokenizer),
                *tokenizer.encode(after.format(question=question))]

    def grid_schedule(self, h: int, w: int, t: int = 1) -> list[int]:
        """What may follow IMG at each offset: VISUAL (any code) or the one structural token that must stand
        there. Rows of w codes + EOL, EOF after each of the t code frames, then EOI and EOS."""
        if not self.has_row_markers:   # LlamaGen: the codes alone; Chameleon: a contiguous block, then EOI
            return [VISUAL] * (t * h * w) + ([self.eoi] if self.eoi is not None else [])
        frame = ([VISUAL] * w + [self.eol]) * h + [self.eof]
        return frame * t + [self.eoi, self.eos]

    def row_ends(self, h: int, w: int, t: int = 1) -> list[int]:
        """The offsets in grid_schedule(h, w, t) at which a row is complete (its EOL, or its last code)."""
        if not self.has_row_markers:
            return list(range(w - 1, t * h * w, w))
        return [step for step, kind in enumerate(self.grid_schedule(h, w, t)) if kind == self.eol]

    # --- reading -------------------------------------------------------------------------------------------

    def decode(self, tokens, tokenizer, repair: bool = False) -> list:
        """Token ids -> list of parts: str for text runs, Plan for a plan, LongTensor (h, w) or (t, h, w) for image
        blocks. Stops at EOS; BOS and PAD are skipped. Raises LayoutError on malformed structure unless `repair`."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        parts, text, i = [], [], 0
        while i < len(tokens):
            tok = tokens[i]
            if tok == self.eos:
                break
            if tok == self.boi:
                if text:
                    parts.append(tokenizer.decode(text))
                    text = []
                codes, i = self._read_block(tokens, i, tokenizer, repair)
                parts.append(codes)
                continue
            if self.has_plans and tok == self.bop:
                if text:
                    parts.append(tokenizer.decode(text))
                    text = []
                plan, i = self._read_plan(tokens, i, tokenizer)
                parts.append(plan)
                continue
            if tok in (self.bos, self.pad):
                pass
            elif self.is_special(tok) or self.first_visual <= tok < self.vocab_size:
                if not repair:
                    raise LayoutError(f"token {i}: {self.name(tok)} outside an image block")
            else:
                text.append(tok)
            i += 1
        if text:
            parts.append(tokenizer.decode(text))
        return parts

    def _read_plan(self, tokens: list[int], start: int, tokenizer) -> tuple[Plan, int]:
        """The plan whose BOP is at `start`: text tokens up to EOP. Returns (plan, index after EOP)."""
        for i in range(start + 1, len(tokens)):
            if tokens[i] == self.eop:
                return Plan(tokenizer.decode(tokens[start + 1:i])), i + 1
            if self.is_special(tokens[i]) or self.first_visual <= tokens[i] < self.vocab_size:
                raise LayoutError(f"token {i}: {self.name(tokens[i])} inside the plan that starts at token {start} "
                                  f"(a plan is text, closed by EOP)")
        raise LayoutError(f"the plan starting at token {start} is never closed by EOP")

    def decode_image(self, tokens, tokenizer, repair: bool = False) -> torch.Tensor:
        """The codes of the first image block in `tokens`."""
        for part in self.decode(tokens, tokenizer, repair):
            if torch.is_tensor(part):
                return part
        raise LayoutError("no image block (BOI ... EOI) in the sequence")

    def _read_block(self, tokens: list[int], start: int, tokenizer, repair: bool):
        """Read the image block whose BOI is at `start`: the meta text, then the grid. Returns (codes, end):
        codes (h, w) for an "h*w" block, (t, h, w) for a "t*h*w" one."""
        if self.fixed_grid:   # Chameleon: no meta text, the layout's grid
            return self.read_grid(tokens, *self.image_grid, start=start + 1, repair=repair)
        try:
            img_at = tokens.index(self.img, start)
        except ValueError:
            raise LayoutError(f"token {start}: BOI is never followed by IMG") from None
        meta = tokenizer.decode(tokens[start + 1:img_at])
        match = re.fullmatch(r"\s*(\d+)\*(\d+)(?:\*(\d+))?\s*", meta)
        if match is None:
            raise LayoutError(f"token {start + 1}: image meta text {meta!r} is not 'h*w' or 't*h*w'")
        dims = [int(g) for g in match.groups() if g is not None]
        t, h, w = dims if len(dims) == 3 else (1, *dims)
        codes, end = self.read_grid(tokens, h, w, t, start=img_at + 1, repair=repair)
        return (codes.view(t, h, w) if len(dims) == 3 else codes), end   # "1*h*w" stays a clip of one code frame

    def read_grid(self, tokens, h: int, w: int, t: int = 1, start: int = 0, repair: bool = False):
        """Read the t code frames of h x w codes that follow IMG, from tokens[start] through EOI (or through the
        last code, for LlamaGen). Returns (codes, index after the block): codes (h, w) for an image (t = 1),
        (t, h, w) for a clip."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else tokens
        read = self._read_rows if self.has_row_markers else self._read_counted
        codes, end = read(tokens, h, w, t, start, repair)                      # (t, h, w)
        return (codes[0] if t == 1 else codes), end

    def _read_counted(self, tokens: list[int], h: int, w: int, t: int, start: int, repair: bool):
        """A block without row markers: exactly t*h*w codes (LlamaGen), then EOI where the layout has one
        (Chameleon). Read by counting."""
        n, end = t * h * w, start
        while end < len(tokens) and self.first_visual <= tokens[end] < self.vocab_size:
            end += 1
        closed = self.eoi is None or (end < len(tokens) and tokens[end] == self.eoi)
        if not repair:
            if end - start < n:
                what = "the end" if end == len(tokens) else self.name(tokens[end])
                raise LayoutError(f"token {end}: {what} after {end - start} visual tokens of an image block "
                                  f"that needs {n} ({h}x{w})")
            if self.eoi is not None and (end > start + n or not closed):
                raise LayoutError(f"token {start + n}: the image block's {n} codes are followed by "
                                  f"{self.name(tokens[start + n]) if start + n < len(tokens) else 'the end'}, "
                                  f"not EOI")
        grid = self._fit(tokens[start:min(end, start + n)], n, fill=self.first_visual)
        codes = torch.tensor(grid, dtype=torch.long).view(t, h, w) - self.first_visual
        after = start + n if self.eoi is None else min(end + closed, len(tokens))
        return codes, after

    def _read_rows(self, tokens: list[int], h: int, w: int, t: int, start: int, repair: bool):
        """An Emu3 block: split it into frames (by EOF) and rows (by EOL), remembering where every row starts,
        then check every row, frame and the frame count (or, with repair, cut and pad them to the grid)."""
        grid, rows, row, row_start, i = [], [], [], start, start
        while i < len(tokens) and tokens[i] != self.eoi:
            tok = tokens[i]
            if self.first_visual <= tok < self.vocab_size:
                row.append(tok - self.first_visual)
            elif tok == self.eol:
                rows.append((row, row_start))
                row, row_start = [], i + 1
            elif tok == self.eof:
                if row and not repair:
                    raise LayoutError(f"token {i}: EOF in the middle of a row (missing EOL)")
                grid.append(rows)
                rows, row, row_start = [], [], i + 1
            elif not repair:
                raise LayoutError(f"token {i}: {self.name(tok)} inside an image block (expected a visual "
                                  f"token, EOL, EOF or EOI)")
            i += 1
        if i == len(tokens) and not repair:
            raise LayoutError(f"the image block starting at token {start} is never closed by EOI")
        if rows or row:
            if not repair:
                raise LayoutError(f"token {i}: the last frame of the block is not closed by EOF")
            grid.append(rows + ([(row, row_start)] if row else []))

        if not repair:   # the most local complaint first: a bad row says exactly where it starts
            for f, rows in enumerate(grid):
                for r, (row, at) in enumerate(rows):
                    if len(row) != w:
                        raise LayoutError(f"token {at}: row {r} of frame {f} has {len(row)} visual tokens, "
                                          f"expected {w}")
                if len(rows) != h:
                    raise LayoutError(f"image block starting at token {start}: frame {f} has {len(rows)} rows, "
                                      f"expected {h}")
            if len(grid) != t:
                raise LayoutError(f"image block starting at token {start}: {len(grid)} frames, expected {t}")
        # repair: cut or pad every row to w codes, every frame to h rows, the block to t frames
        fixed = [self._fit([self._fit(row, w) for row, _ in rows], h, fill=[0] * w) for rows in grid]
        codes = torch.tensor(self._fit(fixed, t, fill=[[0] * w] * h), dtype=torch.long)   # (t, h, w)
        return codes, min(i + 1, len(tokens))

    @staticmethod
    def _fit(items: list, n: int, fill=0) -> list:
        """Cut to n items or pad by repeating the last one (`fill` if empty). A no-op on well-formed blocks."""
        return items[:n] + [items[-1] if items else fill] * (n - len(items))
