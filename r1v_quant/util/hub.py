"""Models from the Hugging Face Hub: a MODEL argument may be a repo id (`Skywork/Skywork-R1V-38B`).

An existing local path always wins; otherwise a string shaped like `org/name` is resolved with
`huggingface_hub.snapshot_download` into the Hugging Face cache (HF_HOME / HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE are read when the command runs), and the command gets the snapshot directory. Only files
r1v-quant reads as data are downloaded: JSON, safetensors, tokenizer / template files, README and
LICENSE (for the model card), and the remote-code `.py` files, which are never imported here but copied
into AWQ outputs so vLLM / transformers users get a complete checkpoint. Pickle weights (`.bin`, `.pt`,
...) are never downloaded. Downloads resume after an interruption (huggingface_hub keeps `.incomplete`
files) and show huggingface_hub's progress bars.

A revision (branch, tag or commit) is written `org/name@REV` wherever a repo id is accepted, so commands
comparing several models (`eval`, `check`: `--ref org/a@v1 --cand org/b@abc123`) pin each one; commands
taking one model also have `--revision`. Commands take MODEL through
`r1v_quant.cli.params.model_argument()` (or a
`--model`-style option through `model_option()`), which resolves before the command body runs; commands
with several model options call `resolve_model` themselves.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1v_quant.util.errors import R1VError

# Hub ids: `org/name`, each part starting with a letter or digit (no `..`, no leading `/`, `.` or `~`,
# so a relative path such as `./a/b` or `../x/y` is never mistaken for a repo).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
WEIGHT_PATTERNS = ["*.safetensors"]
METADATA_PATTERNS = [
    "*.json",  # config, index, generation config, tokenizer.json / _config, vocab, added / special tokens
    "merges.txt",
    "*.jinja",  # chat_template.jinja
    "README.md",  # the source's license for the model card
    "LICENSE*",
    "*.py",  # remote code: copied into AWQ outputs byte for byte, never imported by r1v-quant
]
# Never downloaded: pickle and other formats r1v-quant does not read, and anything in sub-folders (images,
# evaluation files; the model itself always sits at the top level).
IGNORE_PATTERNS = ["*/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5",
                   "*.gguf", "*.onnx", "*.onnx_data"]  # fmt: skip
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubSource:
    """Where a snapshot directory in the Hugging Face cache came from."""

    repo_id: str
    commit: str


def is_repo_id(model: str) -> bool:
    """`org/name`; a name ending in `.gguf` is a (missing) local file, never a repo."""
    return (
        bool(REPO_ID.match(model))
        and ".." not in model
        and "--" not in model
        and not model.lower().endswith(".gguf")
    )


def split_revision(model: str) -> tuple[str, str | None]:
    """`org/name@REV` -> ("org/name", "REV"); anything else -> (model, None). Repo ids never contain `@`."""
    repo, at, rev = model.partition("@")
    return (repo, rev) if at and rev and is_repo_id(repo) else (model, None)


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub computes it, but from the environment *now* (not at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        raw = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
        return Path(os.path.expandvars(raw)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_source(path: Path | str) -> HubSource | None:
    """`models--Org--Name/snapshots/<sha>` -> HubSource('Org/Name', sha); None for any other directory."""
    p = Path(path).resolve()
    repo_dir = p.parent.parent
    if p.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
        return None
    parts = repo_dir.name[len("models--") :].split("--")
    return HubSource("/".join(parts), p.name) if len(parts) == 2 else None


def snapshot_blobs(path: Path | str) -> Path | None:
    """The blob store a cache snapshot's files link into (`../../blobs/<hash>`), or None."""
    p = Path(path).resolve()
    return p.parent.parent / "blobs" if hub_source(p) is not None else None


def model_name(path: Path | str) -> str:
    """A human name for output files: the repo name for a Hub snapshot, else the directory name."""
    src = hub_source(path)
    return src.repo_id.split("/")[1] if src else Path(path).resolve().name


def resolve_model(
    model: str | Path, revision: str | None = None, *, weights: bool = True, progress: bool = True
) -> Path:
    """A local directory for MODEL: the path itself if it exists, else a Hub repo id (`org/name`, or
    `org/name@REV`) resolved in the cache.

    `weights=False` fetches only config, index, tokenizer and card files (enough for `inspect`, `plan`).
    Anything else (a non-existent path that is not shaped like `org/name`) is returned unchanged, so the
    command reports it as a missing path.
    """
    text = str(model)
    if Path(text).expanduser().exists():
        if revision is not None:
            raise R1VError(
                f"--revision {revision}: MODEL {text} is a local path; --revision is for Hub repo ids"
            )
        return Path(text).expanduser()
    repo, at_rev = split_revision(text)
    if at_rev is not None:
        if revision is not None and revision != at_rev:
            raise R1VError(f"{text}: two revisions (@{at_rev} and --revision {revision}); give one")
        revision = at_rev
    if not is_repo_id(repo):
        return Path(text)
    path = _download(repo, revision, weights=weights, progress=progress)
    rev = f" (revision {revision})" if revision else ""
    if not (path / "config.json").is_file():
        raise R1VError(
            f"{repo}{rev}: no config.json in the repository: not a checkpoint (a GGUF is passed as a local "
            "file: download it, e.g. `hf download REPO FILE.gguf`, and give its path)"
        )
    if weights:
        _check_weights(path, repo, revision)
    return path


def _download(repo_id: str, revision: str | None, *, weights: bool, progress: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ModuleNotFoundError:
        raise R1VError(
            f"{repo_id}: not a local directory, and huggingface_hub (needed for Hub repo ids) is not "
            "installed: pip install huggingface_hub"
        ) from None
    cache, off = hub_cache_dir(), offline()
    rev = f" (revision {revision})" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                local_files_only=off,
                allow_patterns=[*METADATA_PATTERNS, *(WEIGHT_PATTERNS if weights else [])],
                ignore_patterns=IGNORE_PATTERNS,
                library_name="r1v-quant",
                tqdm_class=None if progress else _silent_tqdm(),
            )
        )
    except LocalEntryNotFoundError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = (
            "downloads are off (HF_HUB_OFFLINE is set)" if off else f"the Hub could not be reached ({first})"
        )
        where = (
            f"its snapshot in the Hugging Face cache at {cache} is incomplete"
            if type(e).__name__ == "IncompleteSnapshotError"
            else f"not a local directory and not in the Hugging Face cache at {cache}"
        )
        raise R1VError(
            f"{repo_id}{rev}: {where}, and {why}. Run once with network access (unset HF_HUB_OFFLINE) "
            "or pass a local directory"
        ) from None
    except GatedRepoError:
        raise R1VError(
            f"{repo_id}: gated repository; accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise R1VError(f"{repo_id}: revision {revision!r} not found on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise R1VError(
            f"{repo_id}: not a local directory, and no such model on the Hugging Face Hub "
            "(or it is private: set HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, HFValidationError, ValueError) as e:
        raise R1VError(f"{repo_id}{rev}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise R1VError(f"{repo_id}{rev}: download failed: {e.strerror or e}") from None


def _check_weights(path: Path, repo_id: str, revision: str | None) -> None:
    """A cached snapshot may hold only metadata (an earlier `inspect`) or a cut-off download."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return  # the checkpoint reader reports a bad index with the details
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise R1VError(
                f"{repo_id}: the cached snapshot {path.name[:12]} lacks {len(missing)} weight shard(s) "
                f"({missing[0]}, ...): run once with network access (unset HF_HUB_OFFLINE) to complete it"
            )
    elif not (path / "model.safetensors").is_file():
        raise R1VError(
            f"{repo_id}{f' (revision {revision})' if revision else ''}: no safetensors weights in the "
            "repository (pickle .bin / .pt weights are never downloaded: convert them to safetensors)"
        )


def _silent_tqdm() -> type:
    """huggingface_hub's bars, switched off (`--json` runs)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
