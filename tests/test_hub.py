"""hub.resolve without a network: ids read from a cache folder laid out as huggingface_hub lays it out (hub_cache.py),
the errors when an id is not cached or the Hub is out of reach, and sample.py taking ids in its flags. Each family's
test file loads its tiny released layout by id too (test_emu3.py, test_llamagen.py, test_chameleon.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

import sample
from hub_cache import COMMIT, offline_cache, write_repo  # noqa: F401 (offline_cache is a fixture)
from nano_emu.hub import HubError, parse_id, resolve

hf = pytest.importorskip("huggingface_hub")
ROOT = Path(__file__).resolve().parents[1]
LLAMAGEN = Path(__file__).parent / "fixtures" / "llamagen"


@pytest.mark.parametrize("text, parsed", [
    ("BAAI/Emu3-Gen", ("BAAI/Emu3-Gen", None, None)),
    ("BAAI/Emu3-Gen-hf@main", ("BAAI/Emu3-Gen-hf", "main", None)),
    ("FoundationVision/LlamaGen/c2i_B_256.pt", ("FoundationVision/LlamaGen", None, "c2i_B_256.pt")),
    (f"FoundationVision/LlamaGen@{COMMIT}/vq_ds16_c2i.pt", ("FoundationVision/LlamaGen", COMMIT, "vq_ds16_c2i.pt")),
    ("/abs/path", None), ("./rel/path", None), ("../up/one", None), ("model.pt", None), ("a--b/c", None),
    ("org/name/../../etc", None),
])
def test_what_counts_as_a_hub_id(text, parsed):
    assert parse_id(text) == parsed


def test_the_hand_built_cache_is_one_huggingface_hub_reads(offline_cache):
    write_repo(offline_cache, "FoundationVision/LlamaGen", {"c2i_B_256.pt": b"gpt", "sub/vq.pt": b"vq"})
    info = hf.scan_cache_dir(offline_cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    (revision,) = repo.revisions
    assert repo.repo_id == "FoundationVision/LlamaGen" and revision.commit_hash == COMMIT
    assert revision.refs == {"main"} and {f.file_name for f in revision.files} == {"c2i_B_256.pt", "vq.pt"}


def test_files_folders_and_revisions_from_the_cache(offline_cache):
    snapshot = write_repo(offline_cache, "FoundationVision/LlamaGen", {"c2i_B_256.pt": b"gpt", "vq_ds16_c2i.pt": b"vq"})
    for text in ("FoundationVision/LlamaGen/c2i_B_256.pt", f"FoundationVision/LlamaGen@{COMMIT}/c2i_B_256.pt"):
        path = resolve(text, None)
        assert path == snapshot / "c2i_B_256.pt" and path.read_bytes() == b"gpt"   # the name, not the blob's hash
    assert resolve("FoundationVision/LlamaGen/c2i_B_256.pt", None, revision=COMMIT) == snapshot / "c2i_B_256.pt"
    assert resolve("FoundationVision/LlamaGen", ["*.pt"]) == snapshot
    with pytest.raises(HubError, match=r"FoundationVision/LlamaGen/c2i_L_256.pt is not in the Hugging Face cache .*"
                                       r"HF_HUB_OFFLINE is set: download it once online \(`hf download "
                                       r"FoundationVision/LlamaGen c2i_L_256.pt`\)"):
        resolve("FoundationVision/LlamaGen/c2i_L_256.pt", None)
    with pytest.raises(HubError, match=r"\(revision v2\) is not in the Hugging Face cache"):
        resolve("FoundationVision/LlamaGen@v2/c2i_B_256.pt", None)
    with pytest.raises(ValueError, match=r"pins revision 'v2', but revision='main'"):
        resolve("FoundationVision/LlamaGen@v2/c2i_B_256.pt", None, revision="main")


def test_an_id_not_in_the_cache_offline(offline_cache):
    with pytest.raises(HubError) as error:
        resolve("BAAI/Emu3-Gen", ["config.json", "*.safetensors"])
    message = str(error.value)
    assert message.startswith("BAAI/Emu3-Gen is not in the Hugging Face cache " + str(offline_cache))
    assert "HF_HUB_OFFLINE is set" in message and "`hf download BAAI/Emu3-Gen`" in message
    assert isinstance(error.value, FileNotFoundError)   # what sample.py prints as its one line


def test_an_id_not_in_the_cache_and_no_network(tmp_path, monkeypatch):
    """Not offline, but the Hub is out of reach (a closed local port stands in for it, so the test never waits
    on a real network)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match=r"BAAI/Emu3-VisionTokenizer is not in the Hugging Face cache .*the Hub could "
                                       r"not be reached \(ConnectError: .*\): check the network \(or HF_ENDPOINT\)"):
        resolve("BAAI/Emu3-VisionTokenizer", ["config.json"])


def test_the_id_forms_each_loader_reads(offline_cache):
    write_repo(offline_cache, "FoundationVision/LlamaGen", {"c2i_B_256.pt": b"gpt"})
    with pytest.raises(HubError, match=r"names a repo, not a file in it: give FoundationVision/LlamaGen/FILE"):
        resolve("FoundationVision/LlamaGen", None)
    with pytest.raises(HubError, match=r"is not a local folder; as a Hub id, give the repo alone: BAAI/Emu3-Gen@v1"):
        resolve("BAAI/Emu3-Gen@v1/config.json", ["config.json"])


def test_a_local_path_wins_and_needs_no_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAAI" / "Emu3-Gen").mkdir(parents=True)   # downloaded into ./BAAI/Emu3-Gen: an id-shaped path
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # as if it were not installed
    assert resolve("BAAI/Emu3-Gen", ["config.json"]) == Path("BAAI/Emu3-Gen")
    assert resolve(tmp_path / "missing.pt", None) == tmp_path / "missing.pt"   # not an id: the loader says so
    with pytest.raises(HubError, match=r"BAAI/Emu3-Gen-hf is not a local path, and loading it from the Hugging Face "
                                       r"Hub needs huggingface_hub: pip install 'nano_emu\[weights\]'"):
        resolve("BAAI/Emu3-Gen-hf", ["config.json"])


def test_sample_flags_take_hub_ids(tmp_path, capsys):
    """Whether an id exists is only known when it loads; its shape is checked while parsing."""
    args = sample.parse_args(["--weights", "BAAI/Emu3-Gen", "--vq", "BAAI/Emu3-VisionTokenizer@main", "--prompt", "x"])
    assert (args.weights, args.vq) == ("BAAI/Emu3-Gen", "BAAI/Emu3-VisionTokenizer@main")
    args = sample.parse_args(["--llamagen", "FoundationVision/LlamaGen/c2i_B_256.pt",
                              "--vq", "FoundationVision/LlamaGen/vq_ds16_c2i.pt", "--class", "1"])
    assert args.llamagen == "FoundationVision/LlamaGen/c2i_B_256.pt"
    assert sample.parse_args(["--chameleon", "leloy/Anole-7b-v0.1-hf", "--prompt", "x"]).chameleon
    for flags, says in [(["--chameleon", "no/such/folder"], "no folder no/such/folder (nor a Hugging Face Hub id "
                                                            "ORG/NAME)"),
                        (["--llamagen", "FoundationVision/LlamaGen", "--vq", str(LLAMAGEN / "vq.pt")],
                         "nor a Hugging Face Hub id ORG/NAME/FILE"),
                        (["--weights", str(LLAMAGEN / "vq.pt")], "vq.pt is not a folder")]:
        with pytest.raises(SystemExit) as exit:
            sample.parse_args(flags + ["--class", "1", "--prompt", "x"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and says in err, err


def run_sample(env: dict, *flags):
    """sample.py as a user runs it, HF_HUB_CACHE / HF_HUB_OFFLINE in its environment (huggingface_hub reads them at
    import, as it would for the user); the tiny fixture GPT's size counts as a released one."""
    code = ("from nano_emu.gpt import LLAMAGEN_SIZES; LLAMAGEN_SIZES['GPT-tiny'] = (2, 4, 80); import runpy, sys; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "sample.py"), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sample_script_loads_llamagen_by_id_offline(tmp_path):
    import os
    cache = tmp_path / "cache"
    write_repo(cache, "FoundationVision/LlamaGen", {"c2i_tiny_16.pt": LLAMAGEN / "gpt.pt",
                                                    "vq_ds16_c2i.pt": LLAMAGEN / "vq.pt"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "grid.png"
    done = run_sample(env, "--llamagen", "FoundationVision/LlamaGen/c2i_tiny_16.pt", "--vq",
                      f"FoundationVision/LlamaGen@{COMMIT}/vq_ds16_c2i.pt", "--class", "3", "--image-size", "16",
                      "--out", str(out))
    assert done.returncode == 0 and out.is_file(), done.stderr
    missing = run_sample(env, "--llamagen", "FoundationVision/LlamaGen/c2i_B_256.pt", "--vq",
                         "FoundationVision/LlamaGen/vq_ds16_c2i.pt", "--class", "3", "--out", str(out))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    line = missing.stderr.strip().splitlines()[-1]
    assert line.startswith("sample.py: error: FoundationVision/LlamaGen/c2i_B_256.pt is not in the Hugging Face "
                           f"cache {cache}, and HF_HUB_OFFLINE is set"), line
