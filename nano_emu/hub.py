"""Released weights by Hugging Face Hub id, as well as by a downloaded folder.

    load_emu3("BAAI/Emu3-Gen-hf")                                       # fetched once, then read from the cache
    load_emu3("BAAI/Emu3-Gen", vq_path="BAAI/Emu3-VisionTokenizer")     # the original layout's two repos
    load_llamagen("FoundationVision/LlamaGen/c2i_B_256.pt", "FoundationVision/LlamaGen/vq_ds16_c2i.pt")
    load_chameleon("leloy/Anole-7b-v0.1-hf@<commit>")                   # pinned to a branch, tag or commit

Every loader's path argument goes through `resolve`. A path that exists on disk is used as it is, always. Anything
else shaped like a Hub id is handed to huggingface_hub (an optional extra: pip install nano_emu[weights]), so its
cache (HF_HUB_CACHE), offline mode (HF_HUB_OFFLINE=1), login (HF_TOKEN, `hf auth login`) and progress bars apply as
in any other library built on it. The id is ORG/NAME for a folder loader (Emu3, Chameleon), ORG/NAME/FILE for a
file loader (LlamaGen's .pt files sit side by side in one repo), with an optional @REVISION after NAME: the
spelling of huggingface_hub's own HfFileSystem (org/name@rev/path). Only the files the loader reads are fetched
(`allow_patterns`): Emu3-Gen's remote code or a repo's training checkpoints never are.

Whatever goes wrong (huggingface_hub missing, the id not cached while offline, no network, a gated or unknown
repo, a missing file or revision) is one HubError naming the id, what happened and how to fix it. HubError is a
FileNotFoundError, the weights being neither on disk nor obtainable, so sample.py prints it as its one line.
"""

import re
from pathlib import Path

# ORG/NAME[@REVISION][/FILE]; names as the Hub allows them (letters, digits, - _ .; no "--" or ".." anywhere)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^/\s]+))?(?:/(?P<file>.+))?")


class HubError(FileNotFoundError):
    """Weights named by a Hub id that could not be had; the message says why and what to do."""


def parse_id(text: str) -> tuple[str, str | None, str | None] | None:
    """"ORG/NAME[@REVISION][/FILE]" -> (repo id, revision or None, file in the repo or None); None if it is not
    shaped like a Hub id (an absolute or ./relative path, a Windows path, a name with "--" or "..")."""
    match = HUB_ID.fullmatch(text)
    if match is None or ".." in text or "--" in match["repo"] or match["repo"].endswith(".git"):
        return None
    return match["repo"], match["revision"], match["file"]


def resolve(path_or_id: str | Path, allow_patterns: list[str] | None, revision: str | None = None) -> Path:
    """A local file or folder -> itself; a Hub id -> the local copy huggingface_hub keeps of it (downloaded first
    if need be). allow_patterns: the files of the repo a folder loader reads (the id is then ORG/NAME[@REVISION]);
    None: the loader reads one file, which the id names (ORG/NAME[@REVISION]/FILE). revision: a branch, tag or
    commit, if the id does not pin one itself. A path that neither exists nor looks like an id is returned as is,
    so that the loader says it does not exist."""
    path = Path(path_or_id)
    parsed = None if path.exists() else parse_id(str(path_or_id))
    if parsed is None:
        return path
    repo, pinned, file = parsed
    if pinned and revision and pinned != revision:
        raise ValueError(f"{path_or_id} pins revision {pinned!r}, but revision={revision!r} was also given")
    revision = pinned or revision
    at = f" (revision {revision})" if revision else ""
    if allow_patterns is None and file is None:
        raise HubError(f"{path_or_id} is not a local file, and as a Hub id it names a repo, not a file in it: give "
                       f"{repo}/FILE (e.g. FoundationVision/LlamaGen/c2i_B_256.pt)")
    if allow_patterns is not None and file is not None:
        raise HubError(f"{path_or_id} is not a local folder; as a Hub id, give the repo alone: {repo}"
                       + (f"@{revision}" if revision else ""))
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise HubError(f"{path_or_id} is not a local path, and loading it from the Hugging Face Hub needs "
                       f"huggingface_hub: pip install 'nano_emu[weights]' (or download the files and pass their "
                       f"folder)") from None
    try:
        if file is not None:
            return Path(huggingface_hub.hf_hub_download(repo, file, revision=revision))
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except errors.GatedRepoError:
        raise HubError(f"{repo} is gated on the Hugging Face Hub: accept its terms on https://huggingface.co/{repo} "
                       f"and log in (`hf auth login`, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{path_or_id} is no local path, and the Hugging Face Hub has no repo {repo} (or it is "
                       f"private: log in with `hf auth login`, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"the Hugging Face Hub repo {repo} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError as e:   # not in the cache, and the Hub is off or out of reach
        what = f"{repo}/{file}" if file else repo
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set: download it once online (`hf download " + repo + (
                f" {file}" if file else "") + "`), or unset HF_HUB_OFFLINE"
        else:
            why = (f"the Hub could not be reached ({first_line(e.__cause__ or e)}): check the network (or "
                   f"HF_ENDPOINT), or download it where there is one and copy the cache over")
        raise HubError(f"{what}{at} is not in the Hugging Face cache {constants.HF_HUB_CACHE}, and {why}; or pass a "
                       f"local {'file' if file else 'folder'}") from None
    except errors.EntryNotFoundError:   # the repo exists, the file does not (LocalEntryNotFoundError is caught above)
        raise HubError(f"the Hugging Face Hub repo {repo}{at} has no file {file}") from None
    except Exception as e:   # a failed or interrupted transfer, a full disk, a proxy error, ...
        raise HubError(f"downloading {path_or_id} from the Hugging Face Hub failed: {first_line(e)}") from e


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
