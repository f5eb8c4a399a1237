"""What a cmpt wrapper's ``from_pretrained`` receives from transformers, read for cmpt's loaders
(:mod:`cmpt.hf_auto`; docs/architecture.md "Sharing models").

``AutoModel.from_pretrained`` routes every argument that names a config attribute into the config
it hands the model class, so a field override (``rope=True``, ``normalize=False``) or a changed
``config=`` arrives as a config that differs from the directory's ``config.json``: :func:`prepare`
turns the difference into overrides for cmpt's loader where it takes them, else one error naming
them. ``dtype`` is a torch dtype, its name or ``"auto"``; ``device_map`` is one device. Nothing
transformers hands over is dropped silently.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

__all__ = ["AUTO_KEYS", "Load", "fitting", "prepare", "saved_dtype"]

AUTO_KEYS = ("model_type", "architectures")  # what config.json adds for the Auto classes
HUB_KWARGS = ("revision", "cache_dir", "token")
# what AutoModel.from_pretrained hands every model class; nothing a cmpt loader takes
_AUTO_INTERNAL = ("trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash", "code_revision")
# keys of a config's to_dict() that describe the file, not the model: never overrides
_FILE_KEYS = ("_name_or_path", "transformers_version", "cmpt_model", *AUTO_KEYS)


def _dtype(value: Any) -> torch.dtype | str | None:
    """A ``dtype`` argument as cmpt's loaders take it: a floating-point torch dtype, ``"auto"``
    (the dtype the weights were saved in) or None (cmpt's default, float32)."""
    if value is None or value == "auto" or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    named = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    raise ValueError(
        f"dtype={value!r}: pass a floating-point torch dtype (torch.bfloat16), its name ('bfloat16', "
        "'float16', 'float32') or 'auto' (the dtype the weights were saved in)"
    )


def _device(device_map: Any) -> torch.device | None:
    """A ``device_map`` argument as cmpt's loaders take it: the one device the whole model goes to."""
    device = device_map[""] if isinstance(device_map, dict) and list(device_map) == [""] else device_map
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            return torch.device(device)
        except RuntimeError:
            pass  # "auto", "balanced", ...: refused below
    raise ValueError(
        f"device_map={device_map!r}: a cmpt model loads whole onto one device; pass 'cpu', 'cuda', "
        "'cuda:1', a torch.device or {'': device} (cmpt shards a model for training with FSDP2, "
        "docs/method.md §6, not with a device map)"
    )


def saved_dtype(directory: Path) -> torch.dtype:
    """The dtype of a NativeViT directory's saved floating-point weights (read from the headers)."""
    from cmpt.vision.official_release import read_state

    return next(t.dtype for t in read_state(directory, weights=False).values() if t.is_floating_point())


@dataclass
class Load:
    """A wrapper's ``from_pretrained`` arguments, read by :func:`prepare` for cmpt's loader."""

    directory: Path
    config: PretrainedConfig  # the wrapper's: the directory's config.json with the overrides applied
    overrides: dict[str, Any]  # the config fields that differ from the directory's config.json
    dtype: torch.dtype | str | None
    device: torch.device | None
    attn_implementation: str | None
    extra: dict[str, Any]  # further arguments of cmpt's loader (a VLM's ``rope``)


def prepare(
    cls: type,
    path: str | os.PathLike,
    args: tuple[Any, ...],
    config: Any,
    kwargs: dict[str, Any],
    overridable: Collection[str],
    hint: str = "",
    extra: tuple[str, ...] = (),
) -> Load:
    """Read a wrapper's ``from_pretrained`` arguments. ``AutoModel.from_pretrained`` routes every
    argument that names a config attribute into the ``config`` it hands over (``attn_implementation``
    and ``dtype`` too), so the overrides are the fields where that config, or a caller's ``config=``,
    differs from the directory's ``config.json``; ``overridable`` are those cmpt's loader changes.
    Any other argument or changed field is one error naming it (never dropped)."""
    from cmpt.hub import local_model_dir, missing_path_error

    if args:
        raise TypeError(
            f"{cls.__name__}.from_pretrained takes no positional model arguments ({len(args)} given); "
            "pass its options by name"
        )
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    for k in _AUTO_INTERNAL:
        kwargs.pop(k, None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = _device(kwargs.pop("device_map", None))
    attn = kwargs.pop("attn_implementation", None)
    d = local_model_dir(path, cls.what, **hub)
    if not d.is_dir():
        raise missing_path_error(path, cls.what, "check the path")
    saved = cls.config_class.from_pretrained(d)
    if config is None:  # called directly: the field arguments go into the config, as AutoModel does
        config, kwargs = cls.config_class.from_pretrained(d, return_unused_kwargs=True, **kwargs)
    elif isinstance(config, cls.config_class):
        config = copy.deepcopy(config)
    else:
        raise TypeError(
            f"config= must be a {cls.config_class.__name__} (AutoConfig.from_pretrained of a {cls.what} "
            f"directory), got {type(config).__name__}"
        )
    # fields transformers' config never holds (generation names such as max_length) stay arguments
    dropped = {k: kwargs.pop(k) for k in overridable if k in kwargs}
    bad = sorted(set(kwargs) - set(extra))
    if bad:
        raise TypeError(
            f"from_pretrained of a {cls.what} directory got unsupported arguments {bad}; it takes "
            f"{', '.join(('dtype', 'device_map', 'attn_implementation', *extra, *HUB_KWARGS))} and the "
            f"config fields {sorted(overridable)}"
        )
    before = saved.to_dict()
    changed = {k: v for k, v in config.to_dict().items() if k not in _FILE_KEYS and before.get(k) != v}
    in_config = changed.pop("dtype", None)  # where AutoModel copies a dtype argument
    fixed = sorted(set(changed) - set(overridable))
    if fixed:
        raise ValueError(
            f"{d}: {', '.join(f'{k}={changed[k]!r}' for k in fixed)} cannot be applied when loading a "
            f"{cls.what}; its loader changes only the config fields {sorted(overridable)}{hint}"
        )
    return Load(
        directory=d,
        config=config,
        overrides={**changed, **dropped},
        dtype=_dtype(dtype if dtype is not None else in_config),
        device=device,
        attn_implementation=attn or config._attn_implementation,
        extra={k: kwargs[k] for k in extra if k in kwargs},
    )


@contextlib.contextmanager
def fitting(load: Load) -> Iterator[None]:
    """Around cmpt's loader: saved weights that do not fit the overridden fields (torch's
    ``load_state_dict`` error, a plain RuntimeError) are one ValueError naming those fields; its
    subclasses (out of memory, NotImplementedError, ...) pass unchanged."""
    try:
        yield
    except RuntimeError as e:
        if not load.overrides or type(e) is not RuntimeError:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first mismatch, after its heading
        raise ValueError(
            f"{load.directory}: its saved weights do not fit the overridden config fields "
            f"{sorted(load.overrides)} ({detail}); these fields fix the architecture the weights were "
            "saved with: drop them, or load a directory saved with them"
        ) from None
