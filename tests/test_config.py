"""Typed dataclass configs ⇄ YAML: building, validation, inheritance, overrides, round trips."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from cmpt.config import (
    ConfigError,
    config_hash,
    deep_merge,
    load_config,
    load_yaml,
    resolve_config_path,
    save_config,
    to_dict,
)


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0


@dataclass
class Source:
    name: str
    weight: float = 1.0
    path: Optional[Path] = None  # noqa: UP045 — Optional[...] is part of what is tested


@dataclass
class Ema:
    decay: float = 0.999
    every: int = 1


@dataclass
class Train:
    name: str = "run"
    max_steps: int = 100
    resolutions: list[int] = field(default_factory=lambda: [224])
    optim: Optim = field(default_factory=Optim)
    sources: list[Source] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    ema: Ema | None = None
    precision: Precision = Precision.BF16
    out_dir: Path = Path("runs")
    compile: bool = False


@dataclass
class NeedsName:
    name: str
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("size must be >= 1")


@dataclass
class Mixed:
    value: int | str = 0
    scale: int | float = 1


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- building
def test_defaults_and_nested_from_dict() -> None:
    assert load_config(Train, None) == Train()
    cfg = load_config(
        Train,
        {
            "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "schedule": "linear"},
            "sources": [{"name": "a"}, {"name": "b", "weight": 2, "path": "/data/b"}],
            "losses": {"lm": 1, "align": 0.5},
            "ema": {"decay": 0.99},
            "precision": "fp32",
            "out_dir": "/tmp/x",
        },
    )
    assert cfg.optim == Optim(lr=3e-4, betas=(0.9, 0.95), schedule="linear")
    assert cfg.sources == [Source("a"), Source("b", 2.0, Path("/data/b"))]
    assert isinstance(cfg.sources[1].weight, float)
    assert cfg.losses == {"lm": 1.0, "align": 0.5}
    assert cfg.ema == Ema(decay=0.99)
    assert cfg.precision is Precision.FP32
    assert cfg.out_dir == Path("/tmp/x")


def test_yaml_1_1_scientific_strings(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\nmax_steps: 1e5\nlosses: {lm: 2E-1}\n")
    raw = yaml.safe_load(p.read_text())
    assert raw["optim"]["lr"] == "1e-4"  # the YAML 1.1 pitfall this guards against
    cfg = load_config(Train, p)
    assert cfg.optim.lr == 1e-4
    assert cfg.max_steps == 100000 and isinstance(cfg.max_steps, int)
    assert cfg.losses == {"lm": 0.2}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optim": {"schedule": "step"}}, "optim.schedule"),
        ({"optim": {"lr": "fast"}}, "expected float, got 'fast'"),
        ({"max_steps": 1.5}, "max_steps"),
        ({"compile": "yes"}, "expected bool"),
        ({"compile": 1}, "expected bool"),
        ({"name": 2024}, "expected str"),
        ({"resolutions": 224}, "expected list[int]"),
        ({"resolutions": [224, "big"]}, "resolutions[1]"),
        ({"sources": [{"name": "a", "weight": "x"}]}, "sources[0].weight"),
        ({"sources": [{"weight": 1.0}]}, "missing required key(s) name"),
        ({"optim": {"betas": [0.9]}}, "expected 2 items"),
        ({"optim": 3}, "expected a mapping for Optim"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_type_errors_name_key_and_expectation(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Train, data)
    assert fragment in str(e.value)


def test_literal_error_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"expected one of 'cosine', 'linear', 'constant', got 'step'"):
        load_config(Train, {"optim": {"schedule": "step"}})


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.yaml", {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(Train, p)
    msg = str(e.value)
    assert "'optim.lrr'" in msg and str(p) in msg and "did you mean 'optim.lr'" in msg
    with pytest.raises(ConfigError, match=r"sources\[0\]\.weigth.*did you mean 'sources\[0\]\.weight'"):
        load_config(Train, {"sources": [{"name": "a", "weigth": 2}]})
    with pytest.raises(ConfigError, match="valid keys here"):
        load_config(Train, {"zzzzzz": 1})


def test_required_fields_and_post_init_errors() -> None:
    assert load_config(NeedsName, {"name": "x"}) == NeedsName("x")
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(NeedsName, None)
    with pytest.raises(ConfigError, match="NeedsName rejected the values: size must be >= 1") as e:
        load_config(NeedsName, {"name": "x"}, ["size=0"])  # validation sees the overrides
    assert "size from --set size=0" in str(e.value)  # the override is named, not only the source


def test_unions_of_scalars() -> None:
    cfg = load_config(Mixed, {"value": "abc", "scale": 1.0})
    assert cfg.value == "abc" and cfg.scale == 1.0 and isinstance(cfg.scale, float)
    assert load_config(Mixed, {"value": 3, "scale": 2}) == Mixed(3, 2)
    with pytest.raises(ConfigError, match=r"expected int \| str, got 1.5"):
        load_config(Mixed, {"value": 1.5})


# ----------------------------------------------------------------------------- overrides
def test_overrides_nested_lists_and_yaml_values(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", {"sources": [{"name": "a"}, {"name": "b"}]})
    cfg = load_config(
        Train,
        p,
        [
            "optim.lr=1e-4",
            "optim.betas=[0.8, 0.9]",
            "resolutions=[224, 448]",
            "sources.1.weight=3",
            "losses.align=0.25",  # new key in a dict[str, float]
            "ema.every=4",  # Optional dataclass left at None → built from defaults
            "compile=true",
            "name=stage2",
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.resolutions == [224, 448]
    assert cfg.sources == [Source("a"), Source("b", weight=3.0)]
    assert cfg.losses == {"lm": 1.0, "align": 0.25}
    assert cfg.ema == Ema(every=4)
    assert cfg.compile is True and cfg.name == "stage2"
    # a whole sub-tree from a YAML flow mapping; null back to None
    cfg = load_config(Train, None, ["optim={lr: 0.5, schedule: constant}", "ema.decay=0.5", "ema=null"])
    assert cfg.optim == Optim(lr=0.5, schedule="constant") and cfg.ema is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("optim.lr=fast", "--set optim.lr=fast"),
        ("optim.schedule=step", "expected one of"),
        ("max_steps=[1, 2]", "expected int"),
        ("compile", "must look like a.b.c=value"),
        ("optim..lr=1", "must look like a.b.c=value"),
        ("max_steps.x=1", "has no key 'x'"),
        ("sources.0.weight=1", "not an index"),
        ("resolutions.x=1", "not an index"),
        ("optim.lr=[1,", "not valid YAML"),
    ],
)
def test_override_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Train, None, [override])
    assert fragment in str(e.value)


# ----------------------------------------------------------------------------- base inheritance
def test_base_inheritance_deep_merge_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    _write(
        tmp_path / "common" / "stage1.yaml",
        {
            "name": "s1",
            "optim": {"lr": 1e-3, "warmup_steps": 10},
            "resolutions": [224, 448],
            "losses": {"lm": 1},
        },
    )
    (tmp_path / "exp").mkdir()
    s2 = _write(
        tmp_path / "exp" / "stage2.yaml",
        {"base": "../common/stage1.yaml", "name": "s2", "optim": {"lr": 1e-4}, "resolutions": [896]},
    )
    cfg = load_config(Train, s2)
    assert cfg.name == "s2"
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 10  # dicts merge deep
    assert cfg.resolutions == [896]  # lists replace
    assert cfg.losses == {"lm": 1.0}
    # a list of bases merges left to right, the file itself last
    _write(tmp_path / "exp" / "extra.yaml", {"optim": {"warmup_steps": 99}, "max_steps": 7})
    s3 = _write(tmp_path / "exp" / "s3.yaml", {"base": ["stage2.yaml", "extra.yaml"], "max_steps": 8})
    cfg = load_config(Train, s3, ["optim.lr=0.5"])
    assert (cfg.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps) == ("s2", 0.5, 99, 8)
    assert load_yaml(s3)["max_steps"] == 8


def test_unknown_key_in_base_names_that_file(tmp_path: Path) -> None:
    base = _write(tmp_path / "b.yaml", {"optim": {"lrr": 1}})
    child = _write(tmp_path / "c.yaml", {"base": "b.yaml", "name": "x"})
    with pytest.raises(ConfigError) as e:
        load_config(Train, child)
    assert str(base) in str(e.value) and "did you mean 'optim.lr'" in str(e.value)


def test_base_cycle_and_missing_base(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Train, tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Train, tmp_path / "self.yaml")
    _write(tmp_path / "m.yaml", {"base": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"not found.*base of"):
        load_config(Train, tmp_path / "m.yaml")
    # a diamond (two bases sharing a base) is not a cycle
    _write(tmp_path / "root.yaml", {"max_steps": 1})
    _write(tmp_path / "l.yaml", {"base": "root.yaml"})
    _write(tmp_path / "r.yaml", {"base": "root.yaml"})
    _write(tmp_path / "d.yaml", {"base": ["l.yaml", "r.yaml"]})
    assert load_config(Train, tmp_path / "d.yaml").max_steps == 1


def test_deep_merge_does_not_mutate() -> None:
    a = {"x": {"y": 1, "z": [1]}, "k": 1}
    b = {"x": {"y": 2}, "k": None}
    assert deep_merge(a, b) == {"x": {"y": 2, "z": [1]}, "k": None}
    assert a == {"x": {"y": 1, "z": [1]}, "k": 1}


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Train, _write(tmp_path / "l.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Train, tmp_path / "missing.yaml")
    assert load_config(Train, _write(tmp_path / "empty.yaml", "")) == Train()


# ----------------------------------------------------------------------------- round trip, hash
def test_save_load_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config(
        Train,
        {
            "name": "1e-4",  # a str that looks numeric must stay a str
            "optim": {"lr": 1e-20, "betas": [0.5, 0.25]},
            "sources": [{"name": "yes", "path": "d/x"}],
            "ema": {},
            "precision": "fp32",
            "losses": {"lm": 1.0, "2": 0.5},
        },
    )
    path = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    back = load_config(Train, path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert to_dict(cfg)["optim"]["betas"] == [0.5, 0.25] and to_dict(cfg)["out_dir"] == "runs"
    assert config_hash(back) == config_hash(cfg) and len(config_hash(cfg)) == 12
    assert config_hash(cfg) != config_hash(load_config(Train, path, ["optim.lr=1e-19"]))
    assert config_hash(Train()) == config_hash(Train())
    with pytest.raises(TypeError):
        to_dict({"a": 1})


# ----------------------------------------------------------------------------- resolve_config_path
def test_resolve_config_path(tmp_path: Path) -> None:
    root = tmp_path / "configs"
    (root / "tiny").mkdir(parents=True)
    recipe = _write(root / "tiny" / "comp_stage1.yaml", {"name": "x"})
    _write(root / "tiny" / "comp_stage2.yaml", {"name": "y"})
    local = _write(tmp_path / "mine.yaml", {"name": "z"})
    assert resolve_config_path(str(local), root) == local
    assert resolve_config_path("tiny/comp_stage1", root) == recipe
    assert resolve_config_path("tiny/comp_stage1.yaml", root) == recipe
    with pytest.raises(ConfigError) as e:
        resolve_config_path("tiny/comp_stage3", root)
    msg = str(e.value)
    assert "tiny/comp_stage1, tiny/comp_stage2" in msg and "did you mean" in msg
    with pytest.raises(ConfigError, match=r"\(none\)"):
        resolve_config_path("x", tmp_path / "nothing")
