"""The token layout: exact Emu3 structure, round trips (codes -> tokens -> codes) for images and video, and
malformed sequences that raise clear errors (or are repaired when asked)."""

import pytest
import torch

from nano_emu.layout import EMU3_CHAT_TEMPLATE, VISUAL, Layout, LayoutError
from nano_emu.tokenizer import ByteTokenizer

tok = ByteTokenizer()
L = Layout.tiny(codebook_size=100)


def test_emu3_ids_are_the_released_ones():
    emu3 = Layout.emu3()
    assert (emu3.bos, emu3.eos, emu3.pad, emu3.img, emu3.boi, emu3.eoi, emu3.eol, emu3.eof) == (
        151849, 151850, 151643, 151851, 151852, 151853, 151846, 151847)
    assert emu3.first_visual == 151854 and emu3.vocab_size == 184622


def test_image_block_is_emu3_structure():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    v = L.first_visual
    assert L.image_block(codes, tok) == [
        L.boi, *b"2*3", L.img, v + 1, v + 2, v + 3, L.eol, v + 4, v + 5, v + 6, L.eol, L.eof, L.eoi]


def test_video_block_has_eof_after_every_frame():
    codes = torch.arange(12).view(2, 2, 3)
    block = L.image_block(codes, tok)
    assert block[:7] == [L.boi, *b"2*2*3", L.img]
    assert block.count(L.eof) == 2 and block.count(L.eol) == 4 and block[-2:] == [L.eof, L.eoi]
    frame = 2 * (3 + 1) + 1
    assert block[7 + frame - 1] == L.eof   # the first frame ends after its 2 rows


@pytest.mark.parametrize("shape", [(8, 8), (3, 7), (1, 1), (2, 4, 5), (1, 3, 3), (3, 2, 2)])
def test_round_trip_codes_tokens_codes(shape):
    codes = torch.randint(0, 100, shape)
    tokens = L.encode(["a red circle ", codes, " and more"], tok, eos=True)
    parts = L.decode(tokens, tok)
    assert parts[0] == "a red circle " and parts[2] == " and more"
    assert torch.equal(parts[1], codes)


def test_round_trip_with_emu3_ids():
    emu3 = Layout.emu3()
    codes = torch.randint(0, 32768, (4, 5))
    assert torch.equal(emu3.decode_image(emu3.encode(["x", codes], tok), tok), codes)


def test_prompts():
    assert L.generation_prompt("a cat", 90, 90, tok) == [L.bos, *b"a cat", L.boi, *b"90*90", L.img]
    assert L.generation_prompt("", 2, 3, tok, t=4)[-7:] == [L.boi, *b"4*2*3", L.img]
    codes = torch.zeros(1, 2, dtype=torch.long)
    prompt = L.understanding_prompt(codes, "What is it?", tok, EMU3_CHAT_TEMPLATE)
    block = L.image_block(codes, tok)
    assert prompt == [L.bos, *b"You are a helpful assistant. USER: ", *block, *b"What is it?. ASSISTANT:"]


def test_grid_schedule():
    schedule = L.grid_schedule(2, 3, t=2)
    frame = [VISUAL] * 3 + [L.eol] + [VISUAL] * 3 + [L.eol] + [L.eof]
    assert schedule == frame + frame + [L.eoi, L.eos]
    # the schedule is exactly the image block after IMG (plus EOS), wildcards where codes stand
    block = L.image_block(torch.zeros(2, 2, 3, dtype=torch.long), tok)
    after_img = block[block.index(L.img) + 1:] + [L.eos]
    assert len(after_img) == len(schedule)   # zip below would hide a block longer or shorter than the schedule
    assert [VISUAL if s == VISUAL else t for s, t in zip(schedule, after_img)] == schedule
    assert all(t >= L.first_visual for s, t in zip(schedule, after_img) if s == VISUAL)


def corrupt(edit):
    tokens = L.encode([torch.randint(0, 100, (3, 4))], tok)   # BOS BOI 3*4 IMG rows EOF EOI
    edit(tokens)
    return tokens


IMG_AT = 5   # BOS BOI '3' '*' '4' IMG
ROW1 = IMG_AT + 1 + 5   # first token of row 1


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(ROW1), r"token 11: row 1 of frame 0 has 3 visual tokens, expected 4"),
    (lambda t: t.insert(ROW1, L.first_visual), r"row 1 of frame 0 has 5 visual tokens, expected 4"),
    (lambda t: t.__setitem__(ROW1 + 1, ord("x")), r"token 12: text token 120 inside an image block"),
    (lambda t: t.pop(ROW1 - 1), r"row 0 of frame 0 has 8 visual tokens"),   # missing EOL merges two rows
    (lambda t: t.pop(), r"never closed by EOI"),
    (lambda t: t.__setitem__(slice(-2, -2), [L.first_visual] * 4 + [L.eol]), r"frame 0 has 4 rows, expected 3"),
    (lambda t: t.__setitem__(slice(-1, -1), ([L.first_visual] * 4 + [L.eol]) * 3 + [L.eof]), r"2 frames, expected 1"),
    (lambda t: t.pop(-2), r"not closed by EOF"),
    (lambda t: t.__setitem__(2, ord("x")), r"meta text 'x\*4' is not 'h\*w'"),
    (lambda t: t.remove(L.img), r"BOI is never followed by IMG"),
    (lambda t: t.append(L.first_visual), r"visual token \(code 0\) outside an image block"),
])
def test_malformed_sequences_raise_clear_errors(edit, message):
    with pytest.raises(LayoutError, match=message):
        L.decode(corrupt(edit), tok)


def test_repair_only_when_asked():
    tokens = corrupt(lambda t: t.pop(ROW1))          # row 1 one code short
    with pytest.raises(LayoutError):
        L.decode_image(tokens, tok)
    repaired = L.decode_image(tokens, tok, repair=True)
    assert repaired.shape == (3, 4)
    truncated = L.encode([torch.randint(0, 100, (3, 4))], tok)[:ROW1 + 2]   # generation cut off mid-row
    assert L.decode_image(truncated, tok, repair=True).shape == (3, 4)


def test_bad_codes_are_rejected():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 100\)"):
        L.image_block(torch.tensor([[0, 100]]), tok)
    with pytest.raises(ValueError, match="shape \\(h, w\\) or \\(t, h, w\\)"):
        L.image_block(torch.zeros(4, dtype=torch.long), tok)


def test_tiny_layout_numbers_specials_after_any_text_vocabulary():
    words = Layout.tiny(codebook_size=512, text_vocab=31)
    assert (words.pad, words.eof, words.first_visual, words.vocab_size) == (31, 38, 39, 39 + 512)
    assert Layout.tiny(codebook_size=512).first_visual == 264   # bytes: the default, as before


def test_answer_mask_allows_text_and_eos_only():
    allowed = L.answer_mask(L.vocab_size)
    assert allowed[:256].all() and allowed[L.eos]
    assert not allowed[L.first_visual:].any()
    for marker in (L.pad, L.bos, L.img, L.boi, L.eoi, L.eol, L.eof):
        assert not allowed[marker]
