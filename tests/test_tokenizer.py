"""Tests for nano_emu/tokenizer.py: ByteTokenizer, and Emu3Tokenizer from both released folder layouts.

Three levels:
- a small synthetic tiktoken ranks file (all bytes + a few merges) in the original layout: encode/decode,
  specials inside text, NFC, QWen's digit splitting, skip_special, the layout checks and the error messages;
- the same ranks as an -hf tokenizer.json, written as transformers' converter writes it and built with the
  `tokenizers` library, which must give the same ids as the original layout (and as `tokenizers` itself);
- the real QWen ranks (tests/fixtures/qwen.tiktoken, fetched by tests/fixtures/get_qwen_tiktoken.sh; these
  tests skip without it) at full size, 184622 ids, against an independent reference: transformers'
  Qwen2Tokenizer (HF `tokenizers` BPE over merges, QWen's split regex, NFC) built from the vocab and merges
  derived from the ranks, plus a few ids checked by hand.
"""

import base64
import functools
import json
import sys
from pathlib import Path

import pytest

from nano_emu.tokenizer import (EMU3_IDS, QWEN_PAT_STR, QWEN_SPECIALS, ByteTokenizer, Emu3Tokenizer,
                                load_tiktoken_ranks)

QWEN_TIKTOKEN = Path(__file__).parent / "fixtures" / "qwen.tiktoken"
needs_qwen = pytest.mark.skipif(
    not QWEN_TIKTOKEN.is_file(),
    reason="tests/fixtures/qwen.tiktoken is absent: run `bash tests/fixtures/get_qwen_tiktoken.sh`",
)
IMAGE_SPECIALS = ["<|image token|>", "<|image start|>", "<|image end|>"]

# Each merge is made of two earlier tokens, as in a trained BPE. "90" exists so that only a split regex
# that takes digits one at a time (QWen's) turns "90*90" into 5 tokens; "é" is there for the NFC test.
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"90", b"\n\n", b"  ",
          "é".encode(), "你".encode()[:2], "你".encode(), b"'l", b"'ll"]
STRINGS = ["hello world", "hello, world!", "90*90", "Hello World", "e\u0301t\u00e9", "你好 你", "😀 ok",
           "a  \n\n b\t\tc  ", "", "we'll go", "x\r\n\r\n y",
           "<|extra_203|>a cat<|image start|>2*3<|image token|><|visual token 000004|><|extra_200|>"]


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_bytes(b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in ranks.items()))


def write_vision_tokens(path: Path, n_visual: int) -> None:
    path.write_text("\n".join(IMAGE_SPECIALS + [f"<|visual token {c:06d}|>" for c in range(n_visual)]) + "\n")


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The pair each multi-byte token is merged from (tiktoken BPE stopped below its own rank), in rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            assert pair_ranks[i] < rank, token
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


@functools.cache
def byte_level_table() -> dict[int, str]:
    # transformers' own copy of GPT-2's table, so the -hf files are not written with the module under test
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def byte_level(token: bytes) -> str:
    return "".join(byte_level_table()[b] for b in token)


@pytest.fixture
def ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in MERGES:
        ranks[token] = len(ranks)
    return ranks


@pytest.fixture
def original_dir(tmp_path, ranks) -> Path:
    write_ranks(tmp_path / "emu3.tiktoken", ranks)
    write_vision_tokens(tmp_path / "emu3_vision_tokens.txt", n_visual=16)
    return tmp_path


@pytest.fixture
def tok(original_dir) -> Emu3Tokenizer:
    return Emu3Tokenizer.from_dir(original_dir, check_release_ids=False)


# --- ByteTokenizer ---------------------------------------------------------------------------------------------

def test_byte_tokenizer():
    bt = ByteTokenizer()
    assert bt.n_vocab == 256
    for s in STRINGS:
        assert bt.decode(bt.encode(s)) == s
    assert bt.encode("aé") == [97, 0xC3, 0xA9]
    assert bt.decode([257, 104, 105, 300, 1000]) == "hi"          # layout ids >= 256 are not text
    assert bt.decode([104, 0xE4, 0xBD]) == "h\ufffd"               # truncated UTF-8 -> replacement char


# --- original layout, synthetic ranks ------------------------------------------------------------------------

def test_synthetic_ids_and_roles(tok, ranks):
    n = len(ranks)
    assert tok.n_ranks == n and tok.n_vocab == n + len(QWEN_SPECIALS) + 3 + 16 and tok.n_visual == 16
    # the released ids, shifted by where this vocabulary's special block starts
    assert tok.role_ids == {role: i - 151643 + n for role, i in EMU3_IDS.items()}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n + 206, n + 207, n)
    assert (tok.img_id, tok.boi_id, tok.eoi_id, tok.eol_id, tok.eof_id) == (n + 208, n + 209, n + 210, n + 203, n + 204)
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    assert tok.encode("<|visual token 000015|>") == [tok.first_visual_id + 15] == [tok.n_vocab - 1]


def test_synthetic_round_trip(tok):
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s.replace("e\u0301", "é")     # NFC is the only change


def test_specials_inside_text(tok, ranks):
    ids = tok.encode("<|extra_203|>hello<|image start|>2*3<|image token|><|visual token 000004|><|extra_200|>")
    assert ids == [tok.bos_id, ranks[b"hello"], tok.boi_id, ranks[b"2"], ranks[b"*"], ranks[b"3"], tok.img_id,
                   tok.first_visual_id + 4, tok.eol_id]
    assert tok.encode("<|im_start|><|extra_0|><|endoftext|>") == [tok.n_ranks + 1, tok.n_ranks + 3, tok.pad_id]
    assert tok.encode("<|visual token 99|>") == tok.encode("<|visual") + tok.encode(" token 99|>")  # not a special


def test_qwen_split_digits_and_nfc(tok, ranks):
    assert tok.encode("90*90") == [ranks[b"9"], ranks[b"0"], ranks[b"*"], ranks[b"9"], ranks[b"0"]]
    assert tok.encode("e\u0301") == tok.encode("\u00e9") == [ranks["é".encode()]]
    assert tok.encode("we'll") == [ranks[b"w"], ranks[b"e"], ranks[b"'ll"]]


def test_decode_skip_special_and_replacement(tok, ranks):
    ids = tok.encode("<|extra_203|>hello<|image start|>90<|visual token 000001|> world<|extra_204|>")
    assert tok.decode(ids) == "<|extra_203|>hello<|image start|>90<|visual token 000001|> world<|extra_204|>"
    assert tok.decode(ids, skip_special=True) == "hello90 world"
    assert tok.decode([ranks[b"h"], ranks["你".encode()[:2]]]) == "h\ufffd"
    import torch
    assert tok.decode(torch.tensor(tok.encode("hello"))) == "hello"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])


# --- -hf layout ----------------------------------------------------------------------------------------------

def test_hf_layout_as_the_converter_writes_it(tmp_path, ranks, tok):
    """tokenizer.json as transformers' convert_emu3_weights_to_hf.py writes it: specials in model.vocab too,
    GPT-2's ByteLevel pre-tokenizer (which our loader must ignore), <|extra_0|> renamed <image>."""
    specials = [*QWEN_SPECIALS, *IMAGE_SPECIALS, *(f"<|visual token {c:06d}|>" for c in range(16))]
    specials[3] = "<image>"
    vocab = {byte_level(t): i for t, i in ranks.items()} | {s: len(ranks) + i for i, s in enumerate(specials)}
    merges = [f"{byte_level(a)} {byte_level(b)}" for a, b in bpe_merges(ranks)]
    added = [{"id": len(ranks) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    byte_level_cfg = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    hf_dir = tmp_path / "hf"                                         # not next to the original files
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level_cfg, "post_processor": None, "decoder": byte_level_cfg,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges}}, ensure_ascii=False))
    hf = Emu3Tokenizer.from_dir(hf_dir, check_release_ids=False)
    assert (hf.n_vocab, hf.role_ids) == (tok.n_vocab, tok.role_ids)
    for s in STRINGS:
        assert hf.encode(s) == tok.encode(s), s
    assert hf.encode("<image>") == tok.encode("<|extra_0|>") == [tok.n_ranks + 3]


def test_hf_layout_matches_tokenizers_library(tmp_path, ranks, tok):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    specials = [*QWEN_SPECIALS, *IMAGE_SPECIALS, *(f"<|visual token {c:06d}|>" for c in range(16))]
    vocab = {byte_level(t): i for t, i in ranks.items()}
    merges = [(byte_level(a), byte_level(b)) for a, b in bpe_merges(ranks)]
    reference = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    reference.normalizer = normalizers.NFC()
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    (tmp_path / "hf").mkdir()
    reference.save(str(tmp_path / "hf" / "tokenizer.json"))
    hf = Emu3Tokenizer.from_dir(tmp_path / "hf", check_release_ids=False)
    assert hf.role_ids == tok.role_ids
    for s in STRINGS:
        assert hf.encode(s) == tok.encode(s) == reference.encode(s).ids, s


# --- errors ----------------------------------------------------------------------------------------------------

def test_missing_folder_and_files(tmp_path, ranks):
    with pytest.raises(FileNotFoundError, match="does not exist.*emu3.tiktoken and emu3_vision_tokens.txt"):
        Emu3Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*tokenizer.json \\(-hf layout"):
        Emu3Tokenizer.from_dir(tmp_path)
    write_ranks(tmp_path / "emu3.tiktoken", ranks)
    with pytest.raises(FileNotFoundError, match="emu3_vision_tokens.txt is missing"):
        Emu3Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("bad_line", [b"aGVsbG8=\n", b"aGVsbG8= 7 8\n", b"aGVsbG8= seven\n", b"not*base64 300\n"])
def test_malformed_ranks_line(original_dir, bad_line):
    with open(original_dir / "emu3.tiktoken", "ab") as f:
        f.write(bad_line)
    with pytest.raises(ValueError, match=r"emu3.tiktoken, line 274: expected '<base64 token> <rank>'"):
        Emu3Tokenizer.from_dir(original_dir, check_release_ids=False)


def test_bad_ranks(tmp_path, ranks):
    write_ranks(tmp_path / "gap.tiktoken", {**ranks, b"xyz": len(ranks) + 1})
    with pytest.raises(ValueError, match="ranks must be 0..273, each once"):
        load_tiktoken_ranks(tmp_path / "gap.tiktoken")
    write_ranks(tmp_path / "nobyte.tiktoken", {t: i - 1 for t, i in ranks.items() if t != b"\x00"})
    with pytest.raises(ValueError, match="every single byte needs a rank"):
        load_tiktoken_ranks(tmp_path / "nobyte.tiktoken")


def test_not_an_emu3_vocabulary(original_dir):
    with pytest.raises(ValueError, match="expected the released Emu3 vocabulary"):
        Emu3Tokenizer.from_dir(original_dir)                          # synthetic size, strict by default
    vision = original_dir / "emu3_vision_tokens.txt"
    lines = vision.read_text().splitlines()
    vision.write_text("\n".join([lines[1], lines[0], *lines[2:]]))   # <|image start|> before <|image token|>
    with pytest.raises(ValueError, match="not the Emu3 special-token layout"):
        Emu3Tokenizer.from_dir(original_dir, check_release_ids=False)
    vision.write_text("\n".join(lines[:3] + lines[4:]))               # visual code 0 missing
    with pytest.raises(ValueError, match="missing"):
        Emu3Tokenizer.from_dir(original_dir, check_release_ids=False)
    vision.write_text("\n".join(lines[:4] + lines[5:] + [lines[4]]))  # code 1 moved to the end
    with pytest.raises(ValueError, match="visual tokens out of order"):
        Emu3Tokenizer.from_dir(original_dir, check_release_ids=False)


def test_hf_json_not_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "added_tokens": []}))
    with pytest.raises(ValueError, match="expected a ByteLevel BPE tokenizer.json"):
        Emu3Tokenizer.from_dir(tmp_path)


def test_tiktoken_missing_message(monkeypatch, ranks):
    monkeypatch.setitem(sys.modules, "tiktoken", None)                # makes `import tiktoken` fail
    with pytest.raises(ImportError, match=r"pip install tiktoken \(or pip install nano_emu\[weights\]\)"):
        Emu3Tokenizer(ranks, [*QWEN_SPECIALS, *IMAGE_SPECIALS], check_release_ids=False)


# --- the real QWen ranks, full size ----------------------------------------------------------------------------

REAL_STRINGS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "90*90 and 68*120, pi = 3.14159, year 2024",
    "I'll've DON'T they're WE'D",
    "你好，世界！Emu3 是一个多模态模型。",
    "😀🎉👍🏽 emoji, naïve café",
    "Cafe\u0301 vs Caf\u00e9",                                       # NFC
    "a   b\t\t c  \n   d     ",
    "line1\n\nline2\r\n  indented\n\n\n",
    "def f(x):\n    return x**2  # square\n",
    "<|extra_203|>a cat in the snow<|image start|>2*3<|image token|><|visual token 000001|><|visual token 032767|>"
    "<|visual token 000000|><|extra_200|><|visual token 012345|><|visual token 000007|><|visual token 000008|>"
    "<|extra_200|><|extra_201|><|image end|><|extra_204|>",
    "You are a helpful assistant. USER: <|image start|>1*1<|image token|><|visual token 000042|><|extra_200|>"
    "<|extra_201|><|image end|>Describe it. ASSISTANT:",
]
# Single bytes are the first 256 ranks, in GPT-2's bytes_to_unicode order (printable "!".."~" first, so
# "!" 0, "*" 9, "0".."9" 15..24; then "¡".."¬", "®".."ÿ"; then the 68 others, "\n" (byte 10) at 188 + 10 = 198).
# QWen splits digits one by one, so these follow from the file format alone; "Hello" 9707 and " world" 1879 are
# the ids Qwen/Qwen2 tokenizers are widely quoted with ("Hello, world!" -> 9707, 11, 1879, 0).
HAND_IDS = {"90*90": [24, 15, 9, 24, 15], "!": [0], "\n": [198], "Hello, world!": [9707, 11, 1879, 0]}


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    """Full-size Emu3 folders from qwen.tiktoken: original layout (+ generated emu3_vision_tokens.txt) and an
    -hf layout saved from the reference tokenizer. Returns (original_dir, hf_dir, reference)."""
    data = QWEN_TIKTOKEN.read_bytes()
    assert (len(data), data.count(b"\n")) == (2561218, 151643), "unexpected qwen.tiktoken; re-run the fetch script"
    original = tmp_path_factory.mktemp("emu3_original")
    (original / "emu3.tiktoken").write_bytes(data)
    write_vision_tokens(original / "emu3_vision_tokens.txt", n_visual=32768)

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    ranks = load_tiktoken_ranks(QWEN_TIKTOKEN)
    specials = [*QWEN_SPECIALS, *IMAGE_SPECIALS, *(f"<|visual token {c:06d}|>" for c in range(32768))]
    vocab = {byte_level(t): i for t, i in ranks.items()} | {s: len(ranks) + i for i, s in enumerate(specials)}
    merges = [(byte_level(a), byte_level(b)) for a, b in bpe_merges(ranks)]
    reference = Qwen2Tokenizer(vocab=vocab, merges=merges)
    reference.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    assert len(reference) == 184622
    hf = tmp_path_factory.mktemp("emu3_hf")
    reference.backend_tokenizer.save(str(hf / "tokenizer.json"))
    return original, hf, reference


@pytest.fixture(scope="module")
def real_tok(real_dirs) -> Emu3Tokenizer:
    return Emu3Tokenizer.from_dir(real_dirs[0])                       # strict: the released ids


@needs_qwen
def test_real_vocab_roles(real_tok):
    tok = real_tok
    assert (tok.n_ranks, tok.n_vocab, tok.n_visual) == (151643, 184622, 32768)
    assert tok.role_ids == EMU3_IDS
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.img_id, tok.boi_id, tok.eoi_id, tok.eol_id, tok.eof_id,
            tok.first_visual_id) == (151849, 151850, 151643, 151851, 151852, 151853, 151846, 151847, 151854)
    assert tok.encode("<|visual token 032767|>") == [184621]
    assert tok.encode("<|extra_0|>") == [151646]


@needs_qwen
def test_real_ids_match_qwen2_reference(real_dirs, real_tok):
    _, hf_dir, reference = real_dirs
    tok, hf = real_tok, Emu3Tokenizer.from_dir(hf_dir)
    assert hf.role_ids == tok.role_ids and hf.n_vocab == tok.n_vocab
    for s, ids in HAND_IDS.items():
        assert tok.encode(s) == ids, s
    for s in REAL_STRINGS + list(HAND_IDS):
        ids = tok.encode(s)
        assert ids == reference.encode(s, add_special_tokens=False) == hf.encode(s), s
        assert tok.decode(ids) == reference.decode(ids) == s.replace("e\u0301", "é")
    assert tok.decode(tok.encode(REAL_STRINGS[-1]), skip_special=True) == \
        "You are a helpful assistant. USER: 1*1Describe it. ASSISTANT:"


# --- WordTokenizer (the toy captions, one token per word) -------------------------------------------------------

def test_word_tokenizer_round_trips_the_toy_language():
    from nano_emu import shapes
    from nano_emu.tokenizer import WordTokenizer
    tok = WordTokenizer(shapes.vocabulary())
    _, captions, _ = shapes.sample_shapes(300, 0, split="all")
    _, clip_captions, _ = shapes.sample_moving_shapes(40, 0)
    for text in captions + clip_captions + ["8*8", "2*8*8", "16*16"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("a red circle in the top left")) == 7
    assert tok.encode("8*8") == [tok.ids["8"], tok.ids["*"], tok.ids["8"]]


def test_word_tokenizer_names_an_unknown_word_and_skips_non_text_ids():
    from nano_emu.tokenizer import WordTokenizer
    tok = WordTokenizer(["a", "red", "circle"])
    with pytest.raises(ValueError, match="'purple' is not in this model's vocabulary"):
        tok.encode("a purple circle")
    assert tok.decode([0, 1, 99, 2]) == "a red circle"   # 99: a marker or visual token, not text
    with pytest.raises(ValueError, match="twice"):
        WordTokenizer(["a", "a"])
