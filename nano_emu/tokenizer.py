"""Text tokenizers: raw bytes or whole words for the toy models, Emu3's QWen BPE for the released checkpoints.

Emu3 (Wang et al. 2024, "Emu3: Next-Token Prediction is All You Need") writes text and images into one token
string. Its text tokenizer is QWen's (Bai et al. 2023): a tiktoken byte-level BPE with 151643 ranks and
QWen-7B's split regex, followed by a block of special tokens; Emu3 appends its image specials and the 32768
visual tokens (one per VQ code) to that block, 184622 ids in all. This module rebuilds that tokenizer from
either released folder layout, with the same ids as `tokenization_emu3.py` in baaivision/Emu3:

- original (BAAI/Emu3-Gen, -Chat): `emu3.tiktoken` (base64 token + rank per line) + `emu3_vision_tokens.txt`;
- -hf (BAAI/Emu3-Gen-hf, made by transformers' convert_emu3_weights_to_hf.py): `tokenizer.json`, whose
  ByteLevel vocab is the same ranks spelled as GPT-2 unicode strings, with the specials as `added_tokens`.

Chameleon / Anole ship a `tokenizers` JSON (tokenizer.json, or text_tokenizer.json in the original layout):
`JSONTokenizer` reads it with the `tokenizers` package (also optional), whatever model it describes.

layout.py places these ids; this module only maps text <-> ids. tiktoken is imported lazily: it is an
optional dependency (`pip install nano_emu[weights]`) that the toy models never need.
"""

import base64
import json
import re
import unicodedata
from pathlib import Path

# QWen-7B's split (PAT_STR in tokenization_qwen.py), copied unchanged into Emu3's tokenization_emu3.py.
# Unlike GPT-2's regex it takes digits one at a time (\p{N}), so an image-size string "90*90" is 5 tokens.
QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# QWen's own specials, numbered right after the BPE ranks; emu3_vision_tokens.txt continues the block.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))

# The roles layout.py needs, found by string, and their ids in the released 184622-token vocabulary.
ROLE_TOKENS = {
    "pad": "<|endoftext|>", "eol": "<|extra_200|>", "eof": "<|extra_201|>", "bos": "<|extra_203|>",
    "eos": "<|extra_204|>", "img": "<|image token|>", "boi": "<|image start|>", "eoi": "<|image end|>",
    "first_visual": "<|visual token 000000|>",
}
EMU3_N_RANKS, EMU3_N_VISUAL, EMU3_N_VOCAB = 151643, 32768, 184622
EMU3_IDS = {
    "pad": 151643, "eol": 151846, "eof": 151847, "bos": 151849, "eos": 151850,
    "img": 151851, "boi": 151852, "eoi": 151853, "first_visual": 151854,
}


class ByteTokenizer:
    """The toy models' text tokenizer: UTF-8 bytes are ids 0..255.

    It has no specials of its own: layout.py numbers BOS/EOS/image markers and visual codes from 256 on,
    so decode() drops every id >= 256 (they are not text) and shows broken UTF-8 as U+FFFD.
    """

    n_vocab = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        text_bytes = bytes(i for i in map(int, ids) if i < 256)
        return text_bytes.decode("utf-8", errors="replace")


class WordTokenizer:
    """A toy language's whole words as tokens: "a red circle in the top left" is 7 tokens instead of 28 bytes.

    Emu3 uses a BPE; a closed toy language needs no merges, so its BPE is simply one token per word. The layout
    and the GPT do not care which text tokenizer wrote the string. Text splits into letter runs (words), single
    digits and single other characters (the meta text "8*8" is three tokens); decode joins two words with one
    space and everything else with none, so every caption of the toy language round-trips exactly. A word
    outside the vocabulary is an error that names it, never a silent <unk>.
    """

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise ValueError("WordTokenizer: the vocabulary lists a piece twice")
        self.n_vocab = len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """Words (letter runs), then any other single character (digits, punctuation, "*")."""
        return re.findall(r"[^\W\d_]+|\S", text)

    def encode(self, text: str) -> list[int]:
        pieces = self.split(text)
        unknown = [piece for piece in pieces if piece not in self.ids]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not in this model's vocabulary (text {text!r}); it knows: "
                             f"{' '.join(self.vocab)}")
        return [self.ids[piece] for piece in pieces]

    def decode(self, ids) -> str:
        pieces = [self.vocab[i] for i in map(int, ids) if 0 <= i < self.n_vocab]   # drop non-text ids
        text = ""
        for prev, piece in zip([""] + pieces, pieces):
            text += " " + piece if prev.isalpha() and piece.isalpha() else piece
        return text


def load_tiktoken_ranks(path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`<base64 token> <rank>` per line) and check ranks are 0..n-1."""
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()  # ValueError unless exactly two fields
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)  # binascii.Error is a ValueError
            except ValueError:
                raise ValueError(
                    f"{path}, line {line_no}: expected '<base64 token> <rank>', got {line[:80]!r}"
                ) from None
    _check_ranks(ranks, path)
    return ranks


def _check_ranks(ranks: dict[bytes, int], source) -> None:
    # The special block is numbered from len(ranks), as Emu3 does (SPECIAL_START_ID = 151643), which is only
    # right when the ranks are exactly 0..n-1. Every single byte needs a rank or tiktoken cannot encode it.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{source}: BPE ranks must be 0..{len(ranks) - 1}, each once (found gaps or repeats)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{source}: every single byte needs a rank; bytes {missing[:8]} have none")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the unicode character a ByteLevel vocab uses for each byte.

    Printable latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7f-0xa0, 0xad) are
    shifted to chr(256), chr(257), ... in byte order, so every vocab string is printable.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


def load_hf_tokenizer_json(path) -> tuple[dict[bytes, int], list[str]]:
    """Recover tiktoken ranks and the ordered special tokens from an -hf `tokenizer.json`.

    Only the vocab and added_tokens are read. The converter derived the merges from the ranks, so the ranks
    alone rebuild the original rank-based BPE. It also wrote GPT-2's ByteLevel split (use_regex=True), not
    QWen's; we ignore it and split as the original tokenizer, and so the training data, did.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not data.get("added_tokens"):
        raise ValueError(f"{path}: expected a ByteLevel BPE tokenizer.json with model.vocab and added_tokens")
    added = sorted(data["added_tokens"], key=lambda t: t["id"])
    n_ranks = added[0]["id"]  # specials follow the ranks; the converter also put them into model.vocab
    if [t["id"] for t in added] != list(range(n_ranks, n_ranks + len(added))):
        raise ValueError(f"{path}: added_tokens must have consecutive ids right after the BPE vocab")
    alphabet = _byte_level_alphabet()
    ranks = {}
    for piece, rank in model["vocab"].items():
        if rank < n_ranks:
            if any(c not in alphabet for c in piece):
                raise ValueError(f"{path}: vocab entry {piece!r} (id {rank}) is not a ByteLevel string")
            ranks[bytes(alphabet[c] for c in piece)] = rank
    _check_ranks(ranks, path)
    return ranks, [t["content"] for t in added]


class Emu3Tokenizer:
    """Emu3's text tokenizer: tiktoken BPE over QWen ranks + the special block (QWen's, then Emu3's).

    encode() NFC-normalises and turns every special string inside the text into its id (allowed_special="all"
    in tokenization_emu3.py: understanding prompts are built as strings full of visual tokens).
    Role ids are attributes (`bos_id`, `boi_id`, `first_visual_id`, ...) and `role_ids` (named as layout.Layout's
    fields, so `Layout(**tok.role_ids, codebook_size=tok.n_visual)`); VQ code c is token `first_visual_id + c`.

    With check_release_ids (the default) the vocabulary must be the released one: 151643 ranks, 184622 ids
    and exactly the ids in EMU3_IDS, so another model's tokenizer fails here. Without it (small synthetic
    vocabularies in tests) the same layout is checked relative to the first special id.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: list[str], check_release_ids: bool = True):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(
                "Emu3Tokenizer needs tiktoken: pip install tiktoken (or pip install nano_emu[weights])"
            ) from e
        _check_ranks(mergeable_ranks, "mergeable_ranks")
        self.n_ranks = len(mergeable_ranks)  # == id of the first special token
        self.special_ids = {s: self.n_ranks + i for i, s in enumerate(special_tokens)}
        if len(self.special_ids) != len(special_tokens):
            raise ValueError("special tokens must be distinct")
        self._enc = tiktoken.Encoding(
            "emu3", pat_str=QWEN_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids
        )
        self.n_vocab = self._enc.n_vocab
        self.role_ids = self._find_roles(check_release_ids)
        self.pad_id, self.bos_id, self.eos_id = (self.role_ids[r] for r in ("pad", "bos", "eos"))
        self.img_id, self.boi_id, self.eoi_id = (self.role_ids[r] for r in ("img", "boi", "eoi"))
        self.eol_id, self.eof_id = self.role_ids["eol"], self.role_ids["eof"]
        self.first_visual_id = self.role_ids["first_visual"]
        self.n_visual = self.n_vocab - self.first_visual_id

    def _find_roles(self, check_release_ids: bool) -> dict[str, int]:
        missing = [s for s in ROLE_TOKENS.values() if s not in self.special_ids]
        if missing:
            raise ValueError(f"not an Emu3 vocabulary: special tokens {missing} are missing")
        role_ids = {role: self.special_ids[s] for role, s in ROLE_TOKENS.items()}
        for role, released_id in EMU3_IDS.items():
            expected = self.n_ranks + released_id - EMU3_N_RANKS
            if role_ids[role] != expected:
                raise ValueError(
                    f"not the Emu3 special-token layout: {ROLE_TOKENS[role]} has id {role_ids[role]}, expected "
                    f"{expected} (first special + {released_id - EMU3_N_RANKS}; {released_id} in the release)"
                )
        # layout.py writes code c as first_visual + c, so the visual tokens must run in code order to the end
        id_to_special = {i: s for s, i in self.special_ids.items()}
        for code in range(self.n_vocab - role_ids["first_visual"]):
            token = id_to_special[role_ids["first_visual"] + code]
            if token != f"<|visual token {code:06d}|>":
                raise ValueError(f"visual tokens out of order: id {role_ids['first_visual'] + code} is {token!r}")
        if check_release_ids and (self.n_ranks, self.n_vocab) != (EMU3_N_RANKS, EMU3_N_VOCAB):
            raise ValueError(
                f"expected the released Emu3 vocabulary ({EMU3_N_RANKS} BPE ranks, {EMU3_N_VISUAL} visual tokens, "
                f"{EMU3_N_VOCAB} ids), got {self.n_ranks} ranks and {self.n_vocab} ids; "
                "pass check_release_ids=False for a custom vocabulary"
            )
        assert not check_release_ids or role_ids == EMU3_IDS  # implied by the two checks above
        return role_ids

    @classmethod
    def from_dir(cls, path, check_release_ids: bool = True) -> "Emu3Tokenizer":
        """Load from a released folder, original or -hf layout (detected from the files present)."""
        folder = Path(path)
        expected = (
            "expected emu3.tiktoken and emu3_vision_tokens.txt (original layout, e.g. BAAI/Emu3-Gen) "
            "or tokenizer.json (-hf layout, e.g. BAAI/Emu3-Gen-hf)"
        )
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist; {expected}")
        ranks_file, vision_file = folder / "emu3.tiktoken", folder / "emu3_vision_tokens.txt"
        if ranks_file.exists() or vision_file.exists():
            for file in (ranks_file, vision_file):
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is missing; {expected}")
            ranks = load_tiktoken_ranks(ranks_file)
            # tokenization_emu3.py: one special per non-empty stripped line, numbered after QWen's 208
            vision_tokens = [t.strip() for t in vision_file.read_text(encoding="utf-8").splitlines() if t.strip()]
            return cls(ranks, [*QWEN_SPECIALS, *vision_tokens], check_release_ids)
        if (folder / "tokenizer.json").is_file():
            # the -hf specials are the same block, except <|extra_0|> is renamed <image> (same id, 151646)
            ranks, specials = load_hf_tokenizer_json(folder / "tokenizer.json")
            return cls(ranks, specials, check_release_ids)
        raise FileNotFoundError(f"no tokenizer files in {folder}; {expected}")

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids, skip_special: bool = False) -> str:
        """ids -> text; special tokens decode to their strings unless skip_special (drops ids >= n_ranks)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.n_ranks]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.n_vocab})")
        return self._enc.decode(ids, errors="replace")


class JSONTokenizer:
    """A Hugging Face `tokenizers` JSON file (Chameleon's BPE: text, specials and the 8192 IMGIMG image tokens in
    one 65536-id vocabulary). encode never adds BOS/EOS (layout.py places them); special tokens written in the
    text (e.g. "<reserved08706>") are matched as such, as in the released processor."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("Chameleon's tokenizer needs the `tokenizers` package: pip install nano_emu[weights]") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:   # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"cannot read {path} as a tokenizers JSON file: {e}") from None
        self.vocab = self._tok.get_vocab(with_added_tokens=True)   # name -> id
        self.n_vocab = max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
