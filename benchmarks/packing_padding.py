"""Padding accounting of ``bench_packing.py`` (its part 1; docs/method.md §7): the token positions
and attention score entries of each text pass, padded vs as the model runs them, on the tiny
recipes' real micro-batches and on synthetic samples shaped like CoMP stage II pass 1."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

FULL_RECIPE = "comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1"
TEMPLATE_TOKENS = 30  # Qwen2.5 chat template around one turn (system prompt, role markers), assumed
PROMPT = (math.log(15), 0.5)  # question tokens: lognormal (log median, sigma)
ANSWERS = {"main": (math.log(180), 0.8), "narrow": (math.log(180), 0.5), "wide": (math.log(180), 1.2)}


# --------------------------------------------------------------------------- tiny recipes
def tiny_task(recipe: str, packing: bool | None = None):
    """A ``CompTask`` of a ``tiny/comp_stage*`` recipe on the demo's quick tiny models and data."""
    from cmpt.demo.tiny_models import prepare_tiny
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import CompTask

    paths = prepare_tiny(quick=True)
    sets = [
        f"model.vision={paths['vision']}",
        f"model.llm={paths['llm']}",
        f"data.path={paths['data']}",
        "model.init=''",
        f"run.dir=/tmp/cmpt-bench-packing/{recipe.replace('/', '_')}",
    ]
    if packing is not None:
        sets.append(f"data.packing={str(packing).lower()}")
    cfg, _ = load_recipe(recipe, sets)
    torch.manual_seed(0)
    return CompTask(cfg)


def tiny_batches(task, n: int) -> list[dict]:
    loader = iter(task.build_loader(0, 1))
    return [next(loader) for _ in range(n)]


@contextlib.contextmanager
def recorded_layouts(vlm):
    """Record ``(pass, TextLayout, attention implementation)`` of every text pass the VLM runs
    (``lm``, or ``caption`` inside ``text_features``), by wrapping the instance's methods."""
    from cmpt.vlm.text_attention import attn_implementation

    calls: list[tuple[str, object, str]] = []
    phase = ["lm"]
    hidden, features = vlm.text_hidden, vlm.text_features

    def text_hidden(embeds, layout, attention="causal"):
        calls.append((phase[0], layout, attn_implementation(vlm.llm)))
        return hidden(embeds, layout, attention)

    def text_features(*args, **kwargs):
        phase[0] = "caption"
        try:
            return features(*args, **kwargs)
        finally:
            phase[0] = "lm"

    vlm.text_hidden, vlm.text_features = text_hidden, text_features
    try:
        yield calls
    finally:
        del vlm.text_hidden, vlm.text_features  # back to the class's methods


@dataclass
class Tally:
    """Token positions of one text pass, summed over micro-batches."""

    real: int = 0
    padded: int = 0  # rows × longest row
    computed: int = 0  # TextLayout.positions_computed of the layout the model ran
    attn_padded: int = 0  # attention score entries, rows × width², padded
    attn_run: int = 0  # ... of the layout and kernel the model ran (packed sdpa: Σ lᵢ²)
    attn_dense: int = 0  # ... a dense (1, 1, N, N) mask over the packed row would cost (N², not run)
    attn_blocks: int = 0  # Σ lᵢ² (per-sequence SDPA, flash varlen, block mask)
    impls: set[str] = field(default_factory=set)  # attention implementations the body ran with
    batches: int = 0
    rows: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)  # tokens of the packed row

    def add(
        self, lengths: list[int], computed: int | None = None, run_cells: int | None = None, impl: str = ""
    ):
        """One micro-batch's pass; ``run_cells``: attention cells as run (default Σ lᵢ²)."""
        rows, width, total = len(lengths), max(lengths, default=0), sum(lengths)
        blocks = sum(n * n for n in lengths)
        self.real += total
        self.padded += rows * width
        self.computed += total if computed is None else computed
        self.attn_padded += rows * width * width
        self.attn_run += blocks if run_cells is None else run_cells
        self.attn_dense += total * total
        self.attn_blocks += blocks
        self.batches += 1
        self.rows.append(rows)
        self.widths.append(total)
        if impl:
            self.impls.add(impl)

    @property
    def before(self) -> float:
        return (self.padded - self.real) / max(self.real, 1)

    @property
    def after(self) -> float:
        return (self.computed - self.real) / max(self.real, 1)


def attention_cells(layout, impl: str) -> int:
    """Attention score entries (per layer and head) of ``layout`` run with ``impl``: padded rows
    rows × width²; a packed row Σ lᵢ² on per-sequence SDPA or flash varlen (about that with a block
    mask, which skips whole blocks), N² on a dense mask (``sdpa`` / ``eager`` handed a packed row:
    what cmpt did before ``cmpt_packed_sdpa``)."""
    from cmpt.vlm.packed_sdpa import PACKED_SDPA

    if not layout.packed:
        return len(layout.lengths) * layout.width**2
    if impl == PACKED_SDPA or impl == "flex_attention" or "flash" in impl:
        return sum(n * n for n in layout.lengths)
    return layout.total**2


def measure_tiny_padding(recipe: str, n: int) -> tuple[dict[str, Tally], bool]:
    """Padding and attention cells of the LM and caption passes over ``n`` real micro-batches of a
    tiny recipe, from the layouts and attention implementation the model runs (objective forward
    without gradient)."""
    task = tiny_task(recipe)
    vlm = task.vlm
    tallies = {"lm": Tally(), "caption": Tally()}
    with torch.no_grad(), recorded_layouts(vlm) as calls:
        for batch in tiny_batches(task, n):
            calls.clear()
            task.model(batch)
            for name, layout, impl in calls:
                cells = attention_cells(layout, impl)
                tallies[name].add(list(layout.lengths), layout.positions_computed, cells, impl)
    return tallies, vlm.packing


# --------------------------------------------------------------------------- stage II pass 1, synthetic
def synthetic_stage2_pass1(
    n: int, answers: tuple[float, float], seed: int = 0
) -> tuple[dict[str, Tally], dict]:
    """Padding of ``n`` synthetic stage2_pass1 samples batched by the recipe's budgets."""
    from cmpt.data.batching import TokenBudgetBatcher
    from cmpt.recipes import load_recipe
    from cmpt.vlm.packed_sdpa import PACKED_SDPA
    from cmpt.vlm.text_attention import TextLayout

    cfg, _ = load_recipe(FULL_RECIPE, [])
    d = cfg.data
    proc = cfg.stage.resolution.make_processor(patch_size=14, merge_size=2)  # SigLIP-so400m/14, 2×2 merge
    side = cfg.stage.resolution.fixed_size
    h, w = proc.target_size(side, side)
    image_tokens = (h // proc.factor) * (w // proc.factor)
    rng = np.random.default_rng(seed)
    prompt = np.rint(rng.lognormal(*PROMPT, n)).astype(int).clip(1)
    answer = np.rint(rng.lognormal(*answers, n)).astype(int).clip(1)
    fixed = image_tokens + 2 + TEMPLATE_TOKENS  # merged tokens + vision start/end, template
    text = np.minimum(fixed + prompt + answer, d.max_text_tokens)
    caption = np.minimum(answer, d.caption_max_tokens)
    batcher = TokenBudgetBatcher(
        [(image_tokens, int(t)) for t in text],
        d.vision_budget,
        d.text_budget,
        d.max_samples_per_batch,
        seed=seed,
        oversize=d.oversize,
    )
    tallies = {"lm": Tally(), "caption": Tally()}
    for batch in batcher.epoch_batches(0):
        for name, lens in (("lm", text), ("caption", caption)):
            lengths = [int(lens[i]) for i in batch]
            cu = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            layout = TextLayout.from_cu_seqlens(cu, packed=True)
            tallies[name].add(lengths, layout.positions_computed, attention_cells(layout, PACKED_SDPA))
    info = {
        "image": f"{side}² → {h}×{w}, {image_tokens} merged tokens",
        "budgets": f"vision {d.vision_budget}, text {d.text_budget}, ≤ {d.max_samples_per_batch} samples",
        "clipped": int((fixed + prompt + answer > d.max_text_tokens).sum()),
        "text_mean": float(text.mean()),
        "text_p50": float(np.median(text)),
        "text_p99": float(np.quantile(text, 0.99)),
        "caption_mean": float(caption.mean()),
        "caption_capped": float((answer > d.caption_max_tokens).mean()),
        "packed_n_mean": tallies["lm"].real / max(tallies["lm"].batches, 1),
        "packed_n_max": max(tallies["lm"].widths, default=0),
    }
    return tallies, info
