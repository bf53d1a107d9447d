"""A plan before the picture: plans.py's words, the layout's BOP ... EOP segment (round trips, malformed strings
refused), the scenes world's plans in training strings, a model with plans writing its plan before it draws, and
--plan refused where a world has no plans."""

import numpy as np
import pytest
import torch

from nano_emu import plans, scenes
from nano_emu.layout import Layout, LayoutError, Plan
from nano_emu.scenes import Obj
from nano_emu.tiny import choose_tokenizer
from nano_emu.train import sequences
from nano_emu.world import Scenes


@pytest.fixture(scope="module")
def world():
    return Scenes(plans=True)


@pytest.fixture(scope="module")
def tokenizer(world):
    return choose_tokenizer("auto", [world])[0]


@pytest.fixture(scope="module")
def layout(tokenizer):
    return Layout.tiny(256, text_vocab=tokenizer.n_vocab, plan=True)


def test_a_plan_says_every_object_in_drawing_order_and_reads_back():
    objects = [Obj("blue", "square", "large", 50.0, 50.0), Obj("red", "circle", "small", 10.0, 12.0)]
    text = plans.write(objects)
    assert text == "small red circle at top left then large blue square at bottom right"
    assert plans.read(text) == [plans.Planned("small", "red", "circle", "top", "left"),
                                plans.Planned("large", "blue", "square", "bottom", "right")]
    for bad in ("", "small red circle at top", "small red circle at left top", "huge red circle at top left",
                " then ".join(["small red circle at top left"] * 5)):
        assert plans.read(bad) is None, bad


def test_every_training_scene_has_a_true_plan_that_agrees_with_its_caption(world):
    examples = world.sample(400, np.random.default_rng(0))
    assert all(plans.read(p) is not None for p in examples.plans)
    assert all(plans.agrees(p, c) for p, c in zip(examples.plans, examples.captions))


def test_agrees_tells_a_wrong_plan_from_a_right_one():
    caption = "a red circle left of a blue square"
    assert plans.agrees("small red circle at middle left then large blue square at middle right", caption)
    assert not plans.agrees("large blue square at middle left then small red circle at middle right", caption)
    assert not plans.agrees("small red circle at middle left", caption)                 # one object missing
    assert not plans.agrees("small green circle at middle left then large blue square at middle right", caption)
    assert plans.agrees("small red triangle at top left then large red triangle at bottom middle", "two red triangles")
    assert not plans.agrees("small red triangle at top left", "two red triangles")


def test_the_plan_segment_round_trips_through_the_layout(layout, tokenizer):
    plan = "small red circle at top left then large blue square at bottom right"
    codes = torch.randint(0, 256, (8, 8))
    tokens = layout.encode(["a red circle and a blue square", Plan(plan), codes], tokenizer, eos=True)
    assert tokens.count(layout.bop) == tokens.count(layout.eop) == 1
    caption, read, back = layout.decode(tokens, tokenizer)
    assert caption == "a red circle and a blue square" and isinstance(read, Plan) and read == plan
    assert torch.equal(back, codes)
    prompt = layout.generation_prompt("a red circle", 8, 8, tokenizer, plan="small red circle at top left")
    assert prompt[:len(layout.plan_prompt("a red circle", tokenizer))] == layout.plan_prompt("a red circle", tokenizer)
    assert prompt[-1] == layout.img


def test_a_malformed_plan_is_refused_by_name(layout, tokenizer):
    words = tokenizer.encode("small red circle at top left")
    with pytest.raises(LayoutError, match="BOI inside the plan"):
        layout.decode([layout.bos, layout.bop, *words, layout.boi], tokenizer)
    with pytest.raises(LayoutError, match="never closed by EOP"):
        layout.decode([layout.bos, layout.bop, *words], tokenizer)
    with pytest.raises(LayoutError, match="EOP outside"):
        layout.decode([layout.bos, *words, layout.eop], tokenizer)
    with pytest.raises(ValueError, match="no plan segment"):
        Layout.tiny(256, text_vocab=tokenizer.n_vocab).encode(["a circle", Plan("small red circle at top left")],
                                                               tokenizer)


def test_a_layout_without_plans_is_the_one_it_always_was(tokenizer):
    plain, planned = Layout.tiny(256, text_vocab=tokenizer.n_vocab), Layout.tiny(256, text_vocab=tokenizer.n_vocab,
                                                                                  plan=True)
    assert not plain.has_plans and plain.first_visual == tokenizer.n_vocab + 8
    assert planned.first_visual == plain.first_visual + 2 and {planned.bop, planned.eop} == {plain.first_visual,
                                                                                           plain.first_visual + 1}


def test_training_strings_carry_the_plan_and_drop_it_with_the_caption(world, layout, tokenizer):
    examples = world.sample(64, np.random.default_rng(1))
    codes = torch.randint(0, 256, (64, 8, 8))
    inputs, targets, _ = sequences(layout, tokenizer, codes, examples.captions, examples.answers,
                                   np.random.default_rng(2), p_understand=0.0, p_drop_caption=0.3,
                                   plans=examples.plans)
    rows = torch.cat([inputs, targets[:, -1:]], 1)
    with_plan = [(row == layout.bop).any() for row in rows]
    assert 0 < sum(with_plan) < 64
    for row, planned, caption, plan in zip(rows, with_plan, examples.captions, examples.plans):
        parts = layout.decode(row, tokenizer)
        if planned:
            assert parts[0] == caption and parts[1] == plan
        else:   # the unconditional string: neither caption nor plan
            assert len(parts) == 1 and torch.is_tensor(parts[0])


def test_a_model_with_plans_writes_its_plan_before_it_draws(layout, tokenizer):
    from nano_emu.gpt import GPT, GPTConfig
    from nano_emu.tiny import tiny_pipeline
    from nano_emu.vq import VQConfig, VQModel
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.tiny(layout.vocab_size, dim=64, n_layer=2, intermediate_size=160)).eval()
    pipe = tiny_pipeline(gpt, VQModel(VQConfig.tiny(temporal_factor=1)).eval(), tokenizer, layout, 64,
                         {"cfg_scale": 2.0, "temperature": 1.0})
    for rows in pipe.draw_stream(["a red circle", "two blue squares"], seed=3):
        pass
    assert rows.codes.shape == (2, 8, 8) and len(rows.plans) == 2
    assert all(len(tokenizer.encode(plan)) > 0 for plan in rows.plans)   # words of the vocabulary, no markers
    given = ["small red circle at top left", "small blue square at top left then small blue square at top right"]
    for again in pipe.draw_stream(["a red circle", "two blue squares"], seed=3, plans=given):
        pass
    assert again.plans == given


def test_plan_is_refused_where_the_world_has_none(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "train_tiny.py", "--quick", "--plan", "--out", str(tmp_path / "run")],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--plan" in result.stderr and "--world scenes" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_scenes_vocabulary_grows_by_the_plan_words_only_with_plans():
    assert Scenes().words() == scenes.vocabulary()
    assert set(Scenes(plans=True).words()) == set(scenes.vocabulary()) | set(plans.WORDS)
