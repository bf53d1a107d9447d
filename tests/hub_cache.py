"""A Hugging Face cache folder built by hand, for loading by Hub id without a network.

The layout is huggingface_hub's (its cache-system guide, and `repo_folder_name` / `snapshot_download`):

    <cache>/models--ORG--NAME/blobs/<hash>                       the file contents
    <cache>/models--ORG--NAME/snapshots/<commit>/<path in repo>  a relative symlink to ../../blobs/<hash>
    <cache>/models--ORG--NAME/refs/main                          the commit main points at

so a loader that resolved a symlink to its blob (whose name is a hash) would break here as it would on a real
cache. `huggingface_hub.scan_cache_dir` reading it without a warning is checked in tests/test_hub.py.
"""

import hashlib
import os
from pathlib import Path

import pytest

COMMIT = "1234567890abcdef1234567890abcdef12345678"


def write_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
               ref: str | None = "main") -> Path:
    """Put `files` (path in the repo -> a file to copy, or its bytes) in the cache as repo `repo_id` at `commit`
    (and `ref` pointing at it); returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def write_folder(cache: Path, repo_id: str, folder: Path, patterns: list[str] | None = None, **kw) -> Path:
    """Every file of `folder` (or only those `patterns` select, as huggingface_hub would fetch them) as a repo."""
    from huggingface_hub.utils import filter_repo_objects
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    kept = list(filter_repo_objects(names, allow_patterns=patterns))
    return write_repo(cache, repo_id, {name: folder / name for name in kept}, **kw)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, set as HF_HUB_CACHE with HF_HUB_OFFLINE=1. huggingface_hub reads both variables when
    it is imported (transformers has imported it long before this test), so its constants are set too; the
    script tests (a fresh process) see the variables themselves."""
    from huggingface_hub import constants
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
