"""The NativeViT directory: ``config.json`` (cmpt's config, also read by transformers' ``AutoConfig``
after ``import cmpt``) + ``model.safetensors`` + ``preprocessor_config.json`` (its image processor,
``ImageProcessor.from_pretrained``, docs/method.md §1.4) + a model card ``README.md`` (docs/method.md §1;
docs/architecture.md "Sharing models"). ``NativeViT.save_pretrained`` / ``from_pretrained`` call
these functions; a hub id resolves through :mod:`cmpt.hub`, a tower in the CoMP release's layout
through :mod:`cmpt.vision.official_release`, and ``weights=False`` builds a meta-device skeleton
(FSDP2 ranks > 0, docs/method.md §6 "Distributed training").
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .processor import ImageProcessor
from .vit import CONFIG_NAME, RUNTIME_FIELDS, WEIGHTS_NAME, NativeViT, NativeViTConfig

__all__ = ["load_vit_dir", "save_vit"]


def save_vit(
    model: NativeViT,
    directory: str | Path,
    *,
    model_card: bool = True,
    processor: ImageProcessor | None = None,
    push_to_hub: bool = False,
) -> None:
    """``NativeViT.save_pretrained``: write ``config.json`` (also read by transformers'
    ``AutoConfig`` after ``import cmpt``: :mod:`cmpt.hf_auto`) + ``model.safetensors`` +
    ``preprocessor_config.json`` (``processor``, by default the ViT's own native-resolution one:
    :meth:`ImageProcessor.for_vit`, docs/method.md §1.4) and, with ``model_card``, ``README.md``
    (:mod:`cmpt.model_card`); atomically (:mod:`cmpt.io_atomic`). ``push_to_hub=True`` is refused
    (cmpt writes a local directory; ``hf upload`` publishes it)."""
    from cmpt.hf_auto import _UPLOAD, VIT_TYPE, auto_config_fields
    from cmpt.io_atomic import atomic_directory
    from cmpt.model_card import write_model_card

    if push_to_hub:  # as the AutoModel wrappers refuse it (cmpt.hf_auto)
        raise ValueError(f"save_pretrained(push_to_hub=True): {_UPLOAD}")
    processor = processor or ImageProcessor.for_vit(model.config)  # refused before anything is written

    with atomic_directory(directory, writer="NativeViT.save_pretrained") as out:
        cfg = {"cmpt_model": "NativeViT", **auto_config_fields(VIT_TYPE), **asdict(model.config)}
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        processor.save_pretrained(out)
        if model_card:
            write_model_card(out, sources=[getattr(model, "loaded_from", None)])


def _refuse_architecture_overrides(d: Path, saved: NativeViTConfig, overrides: dict) -> None:
    """A ``ValueError`` naming the overrides that change the saved architecture: every field but
    :data:`~cmpt.vision.vit.RUNTIME_FIELDS` (and ``final_norm=True`` over a tower saved without
    one), where the saved weights would not fit or would silently compute something else."""
    known = {f.name for f in fields(NativeViTConfig)}
    fixed = {
        k: v
        for k, v in overrides.items()
        if k in known  # unknown keys: NativeViTConfig.from_dict names them
        and v != getattr(saved, k)
        and (k not in RUNTIME_FIELDS or (k == "final_norm" and v and not saved.final_norm))
    }
    if fixed:
        given = ", ".join(f"{k}={v!r} (saved {getattr(saved, k)!r})" for k, v in sorted(fixed.items()))
        raise ValueError(
            f"{d}: its saved weights do not fit the overridden config fields {sorted(fixed)} ({given}); "
            "these fields fix the architecture the weights were saved with: drop them, or load a "
            f"directory saved with them (fields a load may change: {list(RUNTIME_FIELDS)})"
        )


def load_vit_dir(
    cls: type,
    directory: str | Path,
    device: str | torch.device | None = None,
    *,
    weights: bool = True,
    **overrides,
) -> NativeViT:
    """``NativeViT.from_pretrained``: load a directory written by :func:`save_vit` (or its hub id:
    :func:`cmpt.hub.local_model_dir`), or a CoMP-VFM tower of the official release
    (:func:`cmpt.vision.official_release.load_official_vit`); ``overrides`` replace config fields
    (e.g. ``rope=True``, ``attn="flex"``, ``keep_prefix_tokens=False``; ``final_norm=False``
    drops a stored final norm, as the official CoMP SigLIP tower does, docs/method.md §1).
    The model's ``loaded_from`` is the directory (its model card names the run behind it).

    ``weights=False`` reads only ``config.json`` and builds the model on the meta device, for
    FSDP2 ranks that get their weights from rank 0 (docs/method.md §6 "Distributed training");
    for a tower of the official release only the weights' headers are read. A malformed
    ``config.json`` or a truncated weight file is a :class:`~cmpt.hub.CorruptFileError` naming it."""
    from cmpt.hub import local_model_dir, read_json, reading_safetensors
    from cmpt.io_atomic import check_loadable

    d = local_model_dir(directory, "NativeViT", must_exist=True)
    check_loadable(d)
    cfg_file = d / CONFIG_NAME
    if not cfg_file.is_file() or read_json(cfg_file).get("cmpt_model") != "NativeViT":
        from cmpt.vision.official_release import detect_official_layout, load_official_vit

        if detect_official_layout(d) == "vit":  # a CoMP-VFM tower of the release (docs/method.md §1.5)
            return load_official_vit(d, device, weights=weights, **overrides)
    if (d / "vlm_config.json").is_file():  # a cmpt VLM, or an Embedder over one
        raise ValueError(
            f"{d} is a cmpt VLM directory (or an Embedder over one), not a NativeViT directory; its "
            f"vision tower is {d / 'vision'}: NativeViT.from_pretrained('{d / 'vision'}')"
        )
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{d} is not a NativeViT directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "for a Hugging Face checkpoint use NativeViT.from_hf"
        )
    raw = read_json(d / CONFIG_NAME)
    if raw.get("cmpt_model") != "NativeViT":
        raise ValueError(
            f"{d / CONFIG_NAME} is not a cmpt NativeViT config; use NativeViT.from_hf for HF models"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _refuse_architecture_overrides(d, NativeViTConfig.from_dict(raw), overrides)
    config = NativeViTConfig.from_dict({**raw, **overrides})
    with contextlib.nullcontext() if weights else torch.device("meta"):
        model = cls(config)
    if weights:
        with reading_safetensors(d / WEIGHTS_NAME):
            state = load_file(str(d / WEIGHTS_NAME), device="cpu")
        if not config.final_norm and raw.get("final_norm", True):  # switched off here: drop its weights
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        model.load_state_dict(state)
    model.loaded_from = d
    return model.to(device) if device is not None else model
