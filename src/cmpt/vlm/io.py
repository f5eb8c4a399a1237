"""Assembly and persistence of a :class:`~cmpt.vlm.model.VisionLanguageModel` (docs/method.md §2 "Assembly").

A VLM directory holds ``vision/`` (a NativeViT directory), ``merger.safetensors``, ``llm/`` (the HF
causal LM and its tokenizer), ``processor/`` (optional) and ``vlm_config.json`` (:class:`VLMConfig`
plus the merger's shape), plus ``config.json`` for transformers' Auto classes (:mod:`cmpt.hf_auto`)
and the model card ``README.md`` (:mod:`cmpt.model_card`). Hub ids go through :mod:`cmpt.hub`.
The functions here take the model class as an argument, so this module does not import the model
(the model's ``build`` / ``from_pretrained`` / ``save_pretrained`` call them). With ``weights=False``
they build the model's skeleton on the meta device from its configs and tokenizer alone, reading
no weight file: FSDP2 ranks > 0 do, and get rank 0's weights when the model is sharded
(docs/method.md §6 "Distributed training"). A weight file whose tensors do not match the class that
loads it is refused (:class:`CheckpointWeightsError`, docs/method.md §3 "Known failure modes of the
reference code"): transformers alone only logs a report and leaves missing weights random.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cmpt.hub import (
    CONFIG_FILES,
    local_model_dir,
    missing_path_error,
    read_json,
    reading_safetensors,
    resolving,
)
from cmpt.io_atomic import atomic_directory, check_loadable
from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import IMAGE_PAD, VISION_END, VISION_START, ensure_vision_tokens
from cmpt.vlm.merger import PatchMerger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cmpt.vlm.model import VisionLanguageModel

VLM_CONFIG_NAME = "vlm_config.json"
MERGER_WEIGHTS = "merger.safetensors"


class CheckpointWeightsError(ValueError):
    """The tensors of a weight file do not match the model class that loads it (docs/method.md §3
    "Known failure modes of the reference code"): weights it lacks would stay randomly initialised,
    tensors the class does not know would be dropped. ``source`` names the checkpoint; ``missing``
    and ``unexpected`` are the sorted parameter names."""

    def __init__(
        self, source: str, model: str, missing: Collection[str], unexpected: Collection[str]
    ) -> None:
        self.source, self.missing, self.unexpected = source, sorted(missing), sorted(unexpected)
        found = [
            f"{len(keys)} {what} (first: {keys[:3]})"
            for what, keys in (("missing", self.missing), ("unexpected", self.unexpected))
            if keys
        ]
        super().__init__(
            f"{source}: the checkpoint's weights do not match {model}: {'; '.join(found)}. Loading it "
            "would leave the missing ones randomly initialised and drop the unexpected ones. It was saved "
            "by a different model class or transformers version, or is incomplete: convert it to the "
            f"layout of {model} (load it with the class and transformers version that wrote it, save it "
            "with this one), or add the missing weights to it deliberately"
        )


def from_pretrained_checked(model_cls: type, source: str, **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained(source, **kwargs)``, refusing a checkpoint with missing or
    unexpected weights (:class:`CheckpointWeightsError`). What is legitimately absent transformers
    already leaves out of its loading report: tied weights (a tied ``lm_head.weight``), non-persistent
    buffers, legacy buffers (``rotary_emb.inv_freq``, ``position_ids``) and the class's
    ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``. Shape mismatches,
    conversion and load errors transformers raises itself (unless ``ignore_mismatched_sizes``); a
    truncated or corrupt weight file is a :class:`~cmpt.hub.CorruptFileError` naming it."""
    with reading_safetensors(source):
        model, info = model_cls.from_pretrained(source, output_loading_info=True, **kwargs)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise CheckpointWeightsError(
            source, type(model).__name__, info["missing_keys"], info["unexpected_keys"]
        )
    return model


@dataclass
class VLMConfig:
    """Facts of a :class:`VisionLanguageModel` (docs/method.md §2 "Assembly"), stored as
    ``vlm_config.json``: where its parts came from and its vision-token ids. Training settings
    (losses, chunk sizes) belong to the recipes, not here."""

    vision: str = ""  # where the ViT came from (NativeViT dir or HF id/dir), informational
    llm: str = ""  # where the LLM came from (HF id/dir), informational
    merge_size: int = 2
    image_pad_id: int = -1
    vision_start_id: int = -1
    vision_end_id: int = -1

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vlm_config.json") -> VLMConfig:
        """Read the known fields; others (training settings written by cmpt ≤ 0.1) are ignored with
        one warning naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"cmpt_model", "merger"})
        if unknown:
            warnings.warn(
                f"{source}: ignoring fields that are no longer part of a VLM's config: {unknown} "
                "(training settings now live in the recipe, e.g. loss.*)",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in d.items() if k in known})


def load_vit(
    vit: NativeViT | str | Path,
    vit_from_hf: bool | None,
    rope: bool | None,
    keep_prefix_tokens: bool,
    weights: bool = True,
) -> NativeViT:
    """A NativeViT from an instance, a NativeViT directory, a CoMP-VFM tower of the official release
    or an HF vision checkpoint (docs/method.md §1, §1.5).

    An HF checkpoint becomes the official CoMP tower (``comp_tower_overrides``: SigLIP loses its
    ``post_layernorm``, stored as ``final_norm: false`` in the ViT config so the saved VLM reloads
    alike); an instance or a NativeViT directory keeps its own ``final_norm``. A release tower
    (detected unless ``vit_from_hf`` is given: :func:`~cmpt.vision.official_release.release_tower_dir`)
    is read by :func:`~cmpt.vision.official_release.load_official_vit`: already the CoMP tower,
    ``pos_embed_order: official``, RoPE as its ``use_rope`` says unless ``rope`` is given.
    ``weights=False`` builds the tower on the meta device from its configs alone
    (``NativeViT.from_pretrained`` / ``NativeViT.from_hf``; a release tower: config and the weights'
    headers).
    """
    if isinstance(vit, NativeViT):
        updates: dict[str, Any] = {"keep_prefix_tokens": keep_prefix_tokens}
        if rope is not None:
            updates["rope"] = rope
        vit.config = replace(vit.config, **updates)  # re-validates (RoPE needs head dim % 4 == 0)
        return vit
    if vit_from_hf is None:  # detect: a release tower, else what its config says (a hub id too)
        from cmpt.vision.official_release import load_official_vit, release_tower_dir

        tower_dir = release_tower_dir(vit)
        if tower_dir is not None:  # a CoMP-VFM tower of the release (docs/method.md §1.5)
            return load_official_vit(
                tower_dir, rope=rope, keep_prefix_tokens=keep_prefix_tokens, weights=weights
            )
        cfg_file = local_model_dir(vit, "vision checkpoint", allow_patterns=CONFIG_FILES) / "config.json"
        vit_from_hf = not (cfg_file.is_file() and "cmpt_model" in read_json(cfg_file))
    if vit_from_hf:
        from cmpt.vision.convert import comp_tower_overrides

        with resolving(vit, "vision checkpoint"):
            tower = comp_tower_overrides(vit)
        return NativeViT.from_hf(
            vit, rope=rope, keep_prefix_tokens=keep_prefix_tokens, weights=weights, **tower
        )
    return NativeViT.from_pretrained(vit, rope=rope, keep_prefix_tokens=keep_prefix_tokens, weights=weights)


def resize_vocab(llm: nn.Module, rows: int) -> None:
    """Grow an HF model's input embeddings (and an untied head) to ``rows`` rows when it has fewer:
    the new rows drawn from the old rows' mean and covariance (transformers' default), or on the
    meta device (a skeleton, ``weights=False``) shapes only."""
    emb = llm.get_input_embeddings()
    if rows > emb.num_embeddings:
        llm.resize_token_embeddings(rows, mean_resizing=not emb.weight.is_meta)


def _causal_lm(source: str, weights: bool, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM`` of ``source`` with all of its weights (:func:`from_pretrained_checked`),
    or its skeleton on the meta device built from ``config.json`` alone (``kwargs``: ``dtype``,
    ``attn_implementation``, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with resolving(source, "language model"):
        if weights:
            return from_pretrained_checked(AutoModelForCausalLM, source, **kwargs)
        config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token} is not a single token of the tokenizer (got ids {ids})")
    return int(ids[0])


def build_vlm(
    cls: type,
    vit: NativeViT | str | Path,
    llm: str | Path | nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    vit_from_hf: bool | None = None,
    rope: bool | None = None,
    keep_prefix_tokens: bool = False,
    processor=None,
    dtype: torch.dtype | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    weights: bool = True,
    **cfg: Any,
) -> VisionLanguageModel:
    """``VisionLanguageModel.build``: assemble a VLM (eval mode) with a fresh PatchMerger (ViT width →
    LLM hidden size) (docs/method.md §2 "Assembly").

    Args:
        vit: a :class:`NativeViT`, a NativeViT directory (``config.json`` with ``cmpt_model``),
            a CoMP-VFM tower of the official release (``load_official_vit``, docs/method.md §1.5)
            or a Hugging Face vision checkpoint (converted with ``NativeViT.from_hf``).
        llm: HF causal-LM id/directory (``AutoModelForCausalLM``, no ``trust_remote_code``) or a
            loaded model. tokenizer: defaults to ``AutoTokenizer`` of ``llm`` (or of the loaded
            model's ``name_or_path``).
        vit_from_hf: force (True) or forbid (False) the HF conversion; None = detect.
        rope: 2D RoPE on/off in the ViT (docs/method.md §2.1: off in stage I, on in II/III); None keeps
            the ViT's setting. keep_prefix_tokens: CLS/registers in the packed stream
            (CoMP recipes: False); applied to a given instance too.
        processor: an ``ImageProcessor`` to attach (default: native policy with the ViT's
            patch size, merge size, mean and std).
        dtype: dtype of a loaded LLM (default float32). llm_kwargs: extra
            ``from_pretrained`` arguments (e.g. ``attn_implementation``).
        weights: False builds the skeleton on the meta device (module docstring): the LLM from
            its ``config.json``, the ViT from a NativeViT directory's or a release tower's config
            and weight headers (see :func:`load_vit`).
        **cfg: :class:`VLMConfig` fields.

    The vision tokens are added to the tokenizer where missing and the embeddings resized when
    the tokenizer then outgrows them; a tokenizer without a pad token gets ``pad = eos``.
    """
    from transformers import AutoTokenizer

    vit_src = "" if isinstance(vit, NativeViT) else str(vit)
    vit = load_vit(vit, vit_from_hf, rope, keep_prefix_tokens, weights)
    llm_src = str(llm) if isinstance(llm, (str, Path)) else getattr(llm, "name_or_path", "")
    if isinstance(llm, (str, Path)):
        llm = _causal_lm(llm_src, weights, dtype=dtype or torch.float32, **(llm_kwargs or {}))
    if tokenizer is None:
        if not llm_src:
            raise ValueError("pass tokenizer= when llm is a model object without a name_or_path")
        with resolving(llm_src, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(llm_src)
    ensure_vision_tokens(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    resize_vocab(llm, len(tokenizer))
    merge = int(cfg.pop("merge_size", vit.config.merge_size))
    if merge != vit.config.merge_size:
        raise ValueError(f"merge_size={merge} differs from the ViT's merge_size={vit.config.merge_size}")
    config = VLMConfig(
        vision=vit_src or vit.config.source,
        llm=llm_src,
        merge_size=merge,
        image_pad_id=_single_token_id(tokenizer, IMAGE_PAD),
        vision_start_id=_single_token_id(tokenizer, VISION_START),
        vision_end_id=_single_token_id(tokenizer, VISION_END),
        **cfg,
    )
    emb = llm.get_input_embeddings()
    with torch.device("meta") if emb.weight.is_meta else contextlib.nullcontext():
        merger = PatchMerger(vit.config.hidden_size, emb.embedding_dim, merge)
    merger = merger.to(device=emb.weight.device)
    if processor is None:
        from cmpt.vision.processor import ImageProcessor

        c = vit.config
        processor = ImageProcessor(c.patch_size, merge, mean=c.image_mean, std=c.image_std)
    return cls(vit, merger, llm, tokenizer, config, processor).eval()


def save_vlm(model: VisionLanguageModel, directory: str | Path) -> Path:
    """``VisionLanguageModel.save_pretrained``: write ``vision/`` (NativeViT), ``merger.safetensors``,
    ``llm/`` (HF model + tokenizer), ``processor/`` (if a processor is attached), ``vlm_config.json``,
    ``config.json`` (Auto classes) and ``README.md`` (model card); atomically (:mod:`cmpt.io_atomic`:
    a complete directory replaces ``directory`` as a whole)."""
    from cmpt.model_card import write_model_card

    with atomic_directory(directory, writer="VisionLanguageModel.save_pretrained") as out:
        _write_vlm(model, out)
        write_model_card(out, sources=[getattr(model, "loaded_from", None)])
    return Path(directory)


def _write_vlm(model: VisionLanguageModel, out: Path) -> None:
    from cmpt.hf_auto import VLM_TYPE, write_auto_config

    model.vit.save_pretrained(out / "vision", model_card=False, processor=model.processor)
    merger_state = {k: v.detach().contiguous().cpu() for k, v in model.merger.state_dict().items()}
    save_file(merger_state, str(out / MERGER_WEIGHTS), metadata={"format": "pt"})
    model.llm.save_pretrained(str(out / "llm"))
    model.tokenizer.save_pretrained(str(out / "llm"))
    if model.processor is not None:
        model.processor.save_pretrained(out / "processor")
    meta = {
        "cmpt_model": "VisionLanguageModel",
        **asdict(model.config),
        "merger": {"vision_dim": model.vit.config.hidden_size, "out_dim": model.merger.fc2.out_features},
    }
    (out / VLM_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    write_auto_config(out, VLM_TYPE, **asdict(model.config))


def load_vlm(
    cls: type,
    directory: str | Path,
    device: str | torch.device | None = None,
    *,
    rope: bool | None = None,
    dtype: torch.dtype | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    weights: bool = True,
    **overrides: Any,
) -> VisionLanguageModel:
    """``VisionLanguageModel.from_pretrained``: load a directory written by :func:`save_vlm` (or its
    hub id: :func:`cmpt.hub.local_model_dir`; eval mode) or a CoMP-MM of the official release
    (:func:`cmpt.vlm.official_release.load_official_vlm`); ``overrides`` replace :class:`VLMConfig`
    fields, ``rope`` the ViT's RoPE switch, ``dtype`` the LLM dtype (default float32). The model's
    ``loaded_from`` is the directory (its model card names the run behind it). ``weights=False``
    reads only the configs, tokenizer and processor and builds the model on the meta device (module
    docstring); of a CoMP-MM of the official release only the weights' headers are read."""
    from transformers import AutoTokenizer

    d = local_model_dir(directory, "cmpt VLM", must_exist=True)
    check_loadable(d)
    if not (d / VLM_CONFIG_NAME).is_file():
        from cmpt.vlm.official_release import detect_official_layout, load_official_vlm

        if detect_official_layout(d) == "vlm":  # a CoMP-MM of the official release (docs/method.md §1.5)
            vit_kw = {} if rope is None else {"rope": rope}
            return load_official_vlm(
                d, dtype=dtype, device=device, llm_kwargs=llm_kwargs, weights=weights, **vit_kw
            )
        raise FileNotFoundError(f"{d} is not a cmpt VisionLanguageModel directory (no {VLM_CONFIG_NAME})")
    bad = sorted(set(overrides) - {f.name for f in fields(VLMConfig)})
    if bad:
        raise TypeError(f"from_pretrained got unknown VLMConfig overrides {bad}")
    for part in ("vision", "llm", MERGER_WEIGHTS):  # not a hub id: "run/final/llm" has that form too
        if not (d / part).exists():
            raise missing_path_error(
                d / part, f"the VLM's {part}", f"{d} is incomplete; save or export it again"
            )
    raw = read_json(d / VLM_CONFIG_NAME)
    config = VLMConfig.from_dict({**raw, **overrides}, source=str(d / VLM_CONFIG_NAME))
    vit = NativeViT.from_pretrained(d / "vision", rope=rope, weights=weights)
    llm = _causal_lm(str(d / "llm"), weights, dtype=dtype or torch.float32, **(llm_kwargs or {}))
    tokenizer = AutoTokenizer.from_pretrained(str(d / "llm"))
    with contextlib.nullcontext() if weights else torch.device("meta"):
        merger = PatchMerger(raw["merger"]["vision_dim"], raw["merger"]["out_dim"], config.merge_size)
    if weights:
        with reading_safetensors(d / MERGER_WEIGHTS):
            state = load_file(str(d / MERGER_WEIGHTS), device="cpu")
        missing, unexpected = merger.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointWeightsError(str(d / MERGER_WEIGHTS), "PatchMerger", missing, unexpected)
    processor = None
    if (d / "processor").is_dir():
        from cmpt.vision.processor import ImageProcessor

        processor = ImageProcessor.from_hf(d / "processor")
    model = cls(vit, merger, llm, tokenizer, config, processor).eval()
    model.loaded_from = d
    return model.to(device) if device is not None else model
