"""load_tiny and the Pipeline it builds, on random runs (tests/tiny_run.py): what a folder must hold, which VQ a GPT
belongs to, what the tiny models draw, and the sampling options the Python API refuses."""

import math
import shutil

import pytest

from nano_emu.tiny import load_tiny
from tiny_run import write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def pipe(run):
    return load_tiny(run)


# ------------------------------------------------------------------------------------------------ the folder


def test_a_gpt_next_to_another_runs_vq_is_refused_by_name(tmp_path, run):
    """Before: it loaded and drew noise (each run's codebook means something else)."""
    other = write_run(tmp_path / "other", seed=1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(run / "gpt.safetensors", mixed)
    shutil.copy(other / "vq.safetensors", mixed)
    with pytest.raises(ValueError, match=rf"{mixed / 'gpt.safetensors'} was trained on another VQ than "
                                         rf"{mixed / 'vq.safetensors'} \(VQ weights [0-9a-f]{{12}} there, "
                                         rf"[0-9a-f]{{12}} here\): the two files come from different runs"):
        load_tiny(mixed)


def test_a_gpt_from_before_the_vq_hash_loads_with_a_note(tmp_path, capsys):
    load_tiny(write_run(tmp_path, record_vq=False))
    assert "predates the record of its VQ" in capsys.readouterr().out


def test_swapped_files_are_named(tmp_path, run):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(run / "gpt.safetensors", swapped / "vq.safetensors")
    shutil.copy(run / "vq.safetensors", swapped / "gpt.safetensors")
    # before: TypeError: VQConfig.__init__() got an unexpected keyword argument 'vocab_size'
    with pytest.raises(ValueError, match=r"vq.safetensors holds a 'gpt' checkpoint, not the VQ \(the two files look "
                                         r"swapped\)"):
        load_tiny(swapped)


@pytest.mark.parametrize("which, change, says", [
    ("vq", {"config": None}, r"vq.safetensors: its metadata has no 'config' entry \(it has kind, step"),   # KeyError
    ("gpt", {"config": None}, r"gpt.safetensors: its metadata has no 'config' entry"),
    ("gpt", {"kind": None, "config": {"vocab": 3}}, r"gpt.safetensors: its 'config' is not a GPTConfig \(.*'vocab'"),
    ("gpt", {"tokenizer": None}, r"gpt.safetensors: its metadata has no 'tokenizer' entry"),
])
def test_metadata_that_lacks_what_load_tiny_reads_names_the_file(tmp_path, which, change, says):
    folder = write_run(tmp_path, **{f"{which}_meta": change})
    with pytest.raises(ValueError, match=says):
        load_tiny(folder)


# ------------------------------------------------------------------------------------------------ drawing


@pytest.mark.parametrize("ratio", ["16:9", "1000:1", "1e300:1", "1:1.5"])
def test_ratios_a_square_model_never_saw_are_refused(pipe, ratio):
    """Before: 16:9 drew 6x11 codes of smeared blobs, 1000:1 1x253 codes, 1e300:1 tried to allocate ~1e151 codes."""
    with pytest.raises(ValueError, match=rf"ratio {ratio}: this model draws square images only \(it was trained on "
                                         rf"64x64 squares\)"):
        pipe.grid(ratio)


def test_square_ratios_draw(pipe):
    assert pipe.grid("1:1") == pipe.grid("3:3") == pipe.grid() == (8, 8)


def test_a_wide_model_draws_up_to_its_limit(pipe):
    from dataclasses import replace
    wide = replace(pipe, max_aspect_ratio=5.0, image_area=720 * 720)   # Emu3's numbers on the toy VQ
    assert wide.grid("16:9") == (68, 120) and wide.grid("5:1")[1] == 201
    with pytest.raises(ValueError, match=r"ratio 1000:1 is 1e\+03:1, wider than the 5:1 this model draws"):
        wide.grid("1000:1")
    with pytest.raises(ValueError, match="two positive numbers"):
        wide.grid("inf:1")


@pytest.mark.parametrize("option, value", [("temperature", -1.0), ("temperature", math.nan),
                                           ("temperature", math.inf), ("cfg_scale", math.nan),
                                           ("cfg_scale", math.inf), ("top_p", 0.0), ("top_p", math.nan),
                                           ("top_k", 0), ("top_k", 2.5), ("cdk_k", 0)])
def test_the_python_api_refuses_bad_sampling_options_by_name(pipe, option, value):
    """Before the Sampling / Guidance objects: temperature -1 drew black images, top_k 0 failed with a tensor size
    error, top_p 0 drew padding."""
    with pytest.raises(ValueError, match=rf"^{option} must be"):
        pipe.draw(["a red circle in the top left"], **{option: value})
    with pytest.raises(ValueError, match=rf"^{option} must be"):
        pipe.options(**{option: value})


def test_a_checkpoint_samples_with_the_defaults_it_records(tmp_path, capsys):
    """A run saves its sampling (recipe.SAMPLING, or --cfg / --temperature); a checkpoint written before runs saved
    it samples unguided at temperature 1, and says so, instead of guessing a preset's."""
    pipe = load_tiny(write_run(tmp_path / "saved", gpt_meta={"sampling": {"cfg_scale": 3.0, "temperature": 0.5,
                                                                           "top_k": None}}))
    assert (pipe.guidance.cfg_scale, pipe.sampling.temperature, pipe.sampling.top_k) == (3.0, 0.5, None)
    assert "records no sampling" not in capsys.readouterr().out
    pipe = load_tiny(write_run(tmp_path / "old", gpt_meta={"sampling": None}))
    assert (pipe.guidance.cfg_scale, pipe.sampling.temperature) == (1.0, 1.0)
    assert "records no sampling defaults" in capsys.readouterr().out


def test_each_kind_of_run_takes_its_row_of_the_sampling_table():
    import train_tiny
    from nano_emu import recipe
    for flags, kind in (([], "shapes"), (["--world", "scenes"], "scenes"), (["--video"], "video")):
        args = recipe.fill_from_preset(train_tiny.parse_args(flags))
        assert (args.cfg, args.temperature) == (recipe.SAMPLING[kind]["cfg"], recipe.SAMPLING[kind]["temperature"])
    args = recipe.fill_from_preset(train_tiny.parse_args(["--cfg", "3", "--temperature", "0.7"]))
    assert (args.cfg, args.temperature) == (3.0, 0.7)
