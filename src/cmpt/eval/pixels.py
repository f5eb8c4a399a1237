"""The image resolution an evaluation runs at (docs/method.md §1.4 "Resolution policy", §5).

* :func:`_model_processor`: the model's image processor (its ViT's default when it has none) with
  ``min_pixels`` / ``max_pixels`` overridden when given;
* :func:`effective_resolution`: the resolution the images actually get from a processor (a fixed
  resolution, the official ``force_resize``, overrides ``max_pixels``);
* :func:`fixed_resolution_note`: the one line results carry where it did;
* :func:`_mean_vision_tokens`: mean merged vision tokens per image at a processor's policy.

Used by :mod:`cmpt.eval.vqa` and the resolution sweep (:mod:`cmpt.eval.resolution`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from cmpt.eval.features import default_processor, processor_with
from cmpt.vision.processor import ImageProcessor

__all__ = ["effective_resolution", "fixed_resolution_note"]


def _model_processor(model: Any, max_pixels: int | None, min_pixels: int | None) -> ImageProcessor:
    proc = getattr(model, "processor", None)
    if proc is None:
        proc = default_processor(model.vit)
    return processor_with(proc, max_pixels, min_pixels)


def effective_resolution(proc: ImageProcessor) -> dict[str, Any]:
    """The resolution the images get from ``proc`` (docs/method.md §1.4): ``{"max_pixels"}``, its
    cap, for the native policy. A fixed-resolution processor (the official ``force_resize``) resizes
    every image to one size, whatever ``max_pixels`` asks (which can only lower it): then
    ``fixed_resolution`` (``"HxW"``), ``max_pixels`` its pixel count, and, where that differs from
    the processor's cap (``--max-pixels``, else the model's own), ``requested_max_pixels`` the cap."""
    if proc.policy != "fixed":
        return {"max_pixels": proc.max_pixels}
    h, w = proc.target_size(proc.fixed_size, proc.fixed_size)  # the same for every input size
    out: dict[str, Any] = {"max_pixels": h * w, "fixed_resolution": f"{h}x{w}"}
    if h * w != proc.max_pixels:
        out["requested_max_pixels"] = proc.max_pixels
    return out


def fixed_resolution_note(points: Sequence[dict[str, Any]]) -> str | None:
    """One line for results (:func:`effective_resolution` fields) where a fixed resolution overrode
    the ``max_pixels`` asked for; None when none did."""
    over = [p for p in points if "fixed_resolution" in p and "requested_max_pixels" in p]
    if not over:
        return None
    asked = ", ".join(str(p["requested_max_pixels"]) for p in over)
    got = ", ".join(str(p["max_pixels"]) for p in over)
    sizes = ", ".join(dict.fromkeys(p["fixed_resolution"] for p in over))
    return (
        f"the model's image processor resizes every image to {sizes} (a fixed resolution, docs/method.md "
        f"§1.4), so max_pixels {asked} cannot raise it: the results report the effective max_pixels "
        f"{got} and the one asked for as requested_max_pixels"
    )


def _mean_vision_tokens(paths: Sequence[str], proc: ImageProcessor) -> float:
    """Mean merged vision tokens per image (``h·w / merge²``) at ``proc``'s resolution policy."""
    counts = []
    for p in dict.fromkeys(paths):
        with Image.open(p) as im:
            h, w = proc.grid_size(im.height, im.width)
        counts.append(h * w // proc.merge_size**2)
    return float(sum(counts) / len(counts)) if counts else 0.0
