"""``NativeViTConfig``: the settings of a :class:`~cmpt.vision.vit.NativeViT` (docs/method.md §1), and
which of them a load may change (:data:`RUNTIME_FIELDS`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

#: The NativeViTConfig fields that ``NativeViT.from_pretrained`` may override: they change how the
#: saved weights run, not which weights there are (``final_norm`` only off). Every other field fixes
#: the architecture the weights were saved with (docs/method.md §1).
RUNTIME_FIELDS = (
    "rope", "rope_theta", "keep_prefix_tokens", "attn", "final_norm", "merge_size", "pos_antialias",
    "pos_embed_order", "norm_eps", "image_mean", "image_std", "source",
)  # fmt: skip


@dataclass
class NativeViTConfig:
    """Architecture of a :class:`NativeViT`. Families differ only in these fields
    (docs/architecture.md, timm-style)."""

    patch_size: int = 14
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1536
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-6
    mlp: str = "gelu"  # gelu | gelu_tanh | quick_gelu | swiglu
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    patch_bias: bool = True
    layerscale_init: float | None = None  # LayerScale when set (DINOv2)
    cls_token: bool = False
    num_register_tokens: int = 0
    pos_embed: str = "learned"  # learned | sincos (AIMv2 native) | none
    pos_grid: int = 16  # side g of the learned g×g table
    pos_cls: bool = False  # the table carries a CLS row (DINOv2, CLIP)
    pos_antialias: bool = False  # antialias in the bicubic resize (HF DINOv2-with-registers)
    pos_embed_order: str = "window"  # window (correct) | official (released CoMP's raster order)
    patch_norm: bool = False  # norm right after the patch embedding (AIMv2)
    pre_norm: bool = False  # norm before the first block (CLIP's pre_layrnorm)
    final_norm: bool = True  # norm after the last block (off: official CoMP SigLIP tower, §1)
    pool: str = "mean"  # cls | mean | map
    pool_norm: bool = False  # norm on the pooled CLS (CLIP's post_layernorm)
    head_intermediate_size: int | None = None  # MLP width of the MAP head (pool == "map")
    rope: bool = False  # 2D RoPE on q/k (C-RoPE); off = pretrained behaviour
    rope_theta: float = 10000.0
    keep_prefix_tokens: bool = True  # CLS/registers in the stream (CoMP recipes: false)
    merge_size: int = 2
    attn: str = "auto"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source: str = ""

    def __post_init__(self) -> None:
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        checks = {
            "pos_embed": ("learned", "sincos", "none"),
            "pos_embed_order": ("window", "official"),
            "pool": ("cls", "mean", "map"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"NativeViTConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError("2D RoPE needs a head dim divisible by 4")

    @property
    def num_prefix_tokens(self) -> int:
        return (int(self.cls_token) + self.num_register_tokens) if self.keep_prefix_tokens else 0

    @classmethod
    def from_dict(cls, d: dict) -> NativeViTConfig:
        """The config of a ``config.json``; its transformers keys (``model_type``, ...) are skipped."""
        from cmpt.hf_auto import AUTO_KEYS

        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"cmpt_model", *AUTO_KEYS}
        if unknown:
            raise ValueError(f"unknown NativeViT config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})
