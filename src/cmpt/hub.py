"""Model names and files in cmpt's loaders: Hugging Face Hub ids, local paths, weight and config
files, and the one-line errors when they cannot be loaded (docs/method.md §2 "Assembly", §3
"Backbones").

Every path where cmpt hands a model name to the hub (``VisionLanguageModel.build``'s LLM and vision
checkpoint, ``NativeViT.from_hf``, ``ImageProcessor.from_hf``, the cmpt directories ``NativeViT`` /
``VisionLanguageModel`` / ``Embedder.from_pretrained`` read by hub id, and the models of
``cmpt encode``, ``cmpt eval`` and the mteb adapter) goes through :func:`resolving` (or
:func:`local_model_dir`, which uses it; what a directory holds is decided on the local snapshot). A
hub id that is neither a local directory nor in the local Hugging Face cache, on a machine that is
offline (``HF_HUB_OFFLINE=1``, or no route to the hub), then fails with :class:`HubOfflineError`:
one line naming the download command of the *installed* ``huggingface_hub`` (``hf download REPO``
where it ships the ``hf`` CLI, ≥ 0.34; ``huggingface-cli download REPO`` before) and
``HF_HUB_OFFLINE``. The failure is told by the exception types huggingface_hub raises
(``LocalEntryNotFoundError``, ``OfflineModeIsEnabled``) anywhere in the chain, never by message
text.

A name loaded through :func:`resolving` that can only be a local path (absolute, ``./``, ``../``,
``~``, or with separators no ``namespace/name`` hub id has) and does not exist is one
``FileNotFoundError`` saying so, with the fix (:func:`missing_path_error`: ``cmpt demo`` for the
tiny models under cmpt's cache), never a hub lookup; loaders that read a directory
(``local_model_dir(..., must_exist=True)``) say so for any missing path before they guess its kind.
Weight files read through :func:`reading_safetensors` and config files through :func:`read_json`
that are truncated or corrupt are one :class:`CorruptFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from cmpt.paths import user_path

__all__ = ["CorruptFileError", "HubOfflineError", "cli_for", "download_command", "hub_cli", "is_hub_id"]
__all__ += ["check_local_path", "local_model_dir", "missing_path_error", "read_json", "reading_safetensors"]
__all__ += ["CONFIG_FILES", "WEIGHT_FILES", "json_ready", "resolving"]

#: ``allow_patterns`` of :func:`local_model_dir` for what a model's configs say (what it is, its
#: preprocessing), and for its configs and safetensors weights (what cmpt's own loaders read).
CONFIG_FILES = ("*.json",)
WEIGHT_FILES = ("*.json", "*.safetensors")


class HubOfflineError(FileNotFoundError):
    """A hub id that is not in the local cache while the hub cannot be reached (or may not be)."""


class CorruptFileError(ValueError):
    """A model file that cannot be parsed: a truncated or corrupt safetensors file, malformed JSON."""


def cli_for(console_scripts: set[str], version: str) -> str:
    """The command-line program of a huggingface_hub with these console scripts (or, when it lists
    none that we know, of this version): ``hf`` from 0.34 on, ``huggingface-cli`` before."""
    if "hf" in console_scripts:
        return "hf"
    if "huggingface-cli" in console_scripts:
        return "huggingface-cli"
    from packaging.version import Version

    return "hf" if Version(version) >= Version("0.34") else "huggingface-cli"


def hub_cli() -> str:
    """``hf`` or ``huggingface-cli``: the command-line program of the installed huggingface_hub."""
    try:
        dist = distribution("huggingface_hub")
    except PackageNotFoundError:  # no distribution metadata: the modern CLI is the one to install
        return "hf"
    return cli_for({ep.name for ep in dist.entry_points if ep.group == "console_scripts"}, dist.version)


def download_command(repo_id: str) -> str:
    """``hf download REPO`` or ``huggingface-cli download REPO``, for the installed huggingface_hub."""
    return f"{hub_cli()} download {repo_id}"


def _repo_id_form(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is no existing local path and has the form of a hub repo id."""
    if not isinstance(name_or_path, str) or user_path(name_or_path).exists():
        return False
    return _repo_id_form(name_or_path)


def _path_like(name: str) -> bool:
    """Whether ``name`` can only be meant as a local path: ``~...``, or with a path separator where
    no hub id has one (absolute, ``./x``, ``../x``, ``a/b/c``; ``facebook/dinov2-small`` is an id)."""
    separators = {"/", os.sep, os.altsep} - {None}
    return name.startswith("~") or (any(c in name for c in separators) and not _repo_id_form(name))


def missing_path_error(path: str | os.PathLike, what: str, fix: str = "check the path") -> FileNotFoundError:
    """The error "``what`` PATH does not exist: ``fix``"; under cmpt's cache (the tiny recipes' models and
    data, ``{cache}/tiny...``), the fix is to build them with ``cmpt demo`` first."""
    from cmpt.paths import cache_root

    p, root = user_path(path).absolute(), cache_root().absolute()
    if p.is_relative_to(root / "tiny-quick"):
        fix = "run `cmpt demo --quick` first to build it (cmpt's tiny models and data)"
    elif p.is_relative_to(root):
        fix = "run `cmpt demo` first to build it (cmpt's tiny models and data)"
    return FileNotFoundError(f"{what} {os.fspath(path)} does not exist: {fix}")


_CHECK_PATH = "check the path (a Hugging Face Hub id has the form namespace/name)"


def check_local_path(name_or_path: str | os.PathLike, what: str) -> None:
    """Raise :func:`missing_path_error` (naming ``what``) for a string that can only be a local path
    (:func:`_path_like`) and does not exist; hub ids and ``Path`` objects pass."""
    if isinstance(name_or_path, str) and _path_like(name_or_path) and not user_path(name_or_path).exists():
        raise missing_path_error(name_or_path, what, _CHECK_PATH)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def offline_error(repo_id: str, what: str) -> HubOfflineError:
    """The one-line error for ``repo_id`` (a ``what``, e.g. "language model") missing offline."""
    cmd = download_command(repo_id)
    if _offline():
        why = "and HF_HUB_OFFLINE=1 forbids downloading it"
        fix = f"run `{cmd}` where the hub is reachable (same HF_HOME), or unset HF_HUB_OFFLINE"
    else:
        why = "and the Hugging Face Hub cannot be reached"
        fix = f"run `{cmd}` where the hub is reachable (same HF_HOME), then set HF_HUB_OFFLINE=1"
    return HubOfflineError(
        f"{what} {repo_id!r} is not a local directory and not in the Hugging Face cache, {why}: "
        f"{fix}; or pass a local directory"
    )


def _hub_unreachable(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def resolving(name_or_path: str | os.PathLike, what: str = "model") -> Iterator[None]:
    """Around a load of ``name_or_path`` (a ``what``): a path-like string that does not exist is
    refused first (:func:`missing_path_error`); when it is a hub id that is not cached and the hub
    is unreachable or forbidden (``HF_HUB_OFFLINE``), raise :class:`HubOfflineError` instead."""
    check_local_path(name_or_path, what)
    try:
        yield
    except OSError as e:
        if isinstance(name_or_path, str) and is_hub_id(name_or_path) and _hub_unreachable(e):
            raise offline_error(name_or_path, what) from e
        raise


def local_model_dir(
    name_or_path: str | os.PathLike,
    what: str = "model",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    allow_patterns: tuple[str, ...] | None = None,
    must_exist: bool = False,
) -> Path:
    """A local directory for ``name_or_path``: the path itself, or for a hub id the snapshot in the
    Hugging Face cache (downloaded when the hub is reachable; :class:`HubOfflineError` when it is
    not cached and the hub is not). ``allow_patterns`` (e.g. :data:`CONFIG_FILES`) downloads only
    those files of a repo (a cached snapshot is returned as it is). A missing path that is no hub id
    is returned as is (the caller's own error names it, e.g. what ``model.init`` should be), or with
    ``must_exist`` refused: one :func:`missing_path_error` naming ``what``, before any guess at what
    kind of directory it is."""
    if not is_hub_id(name_or_path):
        path = user_path(name_or_path)
        if must_exist and not path.exists():
            raise missing_path_error(name_or_path, what, _CHECK_PATH)
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = str(name_or_path)
    try:
        with resolving(repo_id, what):
            patterns = list(allow_patterns) if allow_patterns is not None else None
            snapshot = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=patterns
            )
            return Path(snapshot)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{what} {repo_id!r}: no such local directory, and no Hugging Face Hub repository of that "
            "name that you can access (check the path; a private or gated repo needs HF_TOKEN)"
        ) from None


def _corrupt_weights(path: Path, error: Exception) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is truncated or corrupt ({path.stat().st_size} bytes; {error}): re-download or re-export it"
    )


@contextlib.contextmanager
def reading_safetensors(path: str | os.PathLike) -> Iterator[None]:
    """Around a read of safetensors weights from ``path``: a file, or a model directory (or hub id)
    whose files transformers' ``from_pretrained`` reads. A ``SafetensorError`` (a truncated or
    corrupt file, which safetensors reports without its name) becomes a :class:`CorruptFileError`
    naming the file, its size and the fix; in a directory the damaged ``*.safetensors`` is found
    by opening each."""
    from safetensors import SafetensorError, safe_open

    try:
        yield
    except SafetensorError as e:
        p = user_path(path)
        if p.is_file():
            raise _corrupt_weights(p, e) from None
        for f in sorted(p.glob("*.safetensors")) if p.is_dir() else []:
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except SafetensorError as bad:
                raise _corrupt_weights(f, bad) from None
        raise CorruptFileError(
            f"a safetensors weight file of {path} is truncated or corrupt ({e}): re-download or re-export it"
        ) from None


def json_ready(obj: Any) -> Any:
    """``obj`` with every NaN float (nested in dicts, lists, tuples) as ``None``: strict JSON
    (``null``), which ``json.loads`` of other tools and browsers accept; infinities are kept."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path`` (a model's ``config.json`` and the like); malformed JSON or
    non-UTF-8 bytes are a :class:`CorruptFileError` naming the file (and line and column)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file, or "
            "re-download or re-export the model"
        ) from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(
            f"{p}: not a UTF-8 JSON file ({e.reason} at byte {e.start}); re-download or re-export it"
        ) from None
