"""Hugging Face Hub ids in cmpt's loaders, and the one-line error when they cannot be fetched
(docs/method.md §2 "Assembly", §3 "Backbones").

Every path where cmpt hands a model name to the hub (``VisionLanguageModel.build``'s LLM and
vision checkpoint, ``NativeViT.from_hf``, and the cmpt directories ``NativeViT`` /
``VisionLanguageModel`` / ``Embedder.from_pretrained`` read by hub id) goes through
:func:`resolving` (or :func:`local_model_dir`, which uses it). A hub id that is neither a local
directory nor in the local Hugging Face cache, on a machine that is offline (``HF_HUB_OFFLINE=1``,
or no route to the hub), then fails with :class:`HubOfflineError`: one line naming the download
command of the *installed* ``huggingface_hub`` (``hf download REPO`` where it ships the ``hf`` CLI,
≥ 0.34; ``huggingface-cli download REPO`` before) and ``HF_HUB_OFFLINE``. The failure is told by
the exception types huggingface_hub raises (``LocalEntryNotFoundError``, ``OfflineModeIsEnabled``)
anywhere in the chain, never by message text.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

__all__ = ["HubOfflineError", "cli_for", "download_command", "hub_cli", "is_hub_id", "local_model_dir"]
__all__ += ["resolving"]


class HubOfflineError(FileNotFoundError):
    """A hub id that is not in the local cache while the hub cannot be reached (or may not be)."""


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


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is no existing local path and has the form of a hub repo id."""
    if not isinstance(name_or_path, str) or Path(name_or_path).expanduser().exists():
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return False
    return True


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
    """Around a load of ``name_or_path``: when it is a hub id that is not cached and the hub is
    unreachable or forbidden (``HF_HUB_OFFLINE``), raise :class:`HubOfflineError` instead."""
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
) -> Path:
    """A local directory for ``name_or_path``: the path itself, or for a hub id the snapshot in the
    Hugging Face cache (downloaded when the hub is reachable; :class:`HubOfflineError` when it is
    not cached and the hub is not). A missing path that is no hub id is returned as is (the
    caller's own error names it)."""
    if not is_hub_id(name_or_path):
        return Path(name_or_path).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = str(name_or_path)
    try:
        with resolving(repo_id, what):
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{what} {repo_id!r}: no such local directory, and no Hugging Face Hub repository of that "
            "name that you can access (check the path; a private or gated repo needs HF_TOKEN)"
        ) from None
