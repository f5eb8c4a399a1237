"""Recipes: a typed config and a :class:`cmpt.train.loop.Task` per method (method.md §2 CoMP, §3 MoCa)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def recipes() -> dict[str, tuple[type, type]]:
    """Recipe name (the YAML's ``recipe:`` key) → (config class, task class)."""
    from .comp import CompConfig, CompTask
    from .moca import MocaConfig, MocaTask

    return {"comp": (CompConfig, CompTask), "moca": (MocaConfig, MocaTask)}


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> tuple[Any, Any]:
    """A recipe YAML (path, or packaged name like ``tiny/comp_stage1``) + ``--set`` overrides →
    (typed config, task class)."""
    from ..config import ConfigError, load_config, load_yaml, resolve_config_path

    path = resolve_config_path(name_or_path, CONFIG_ROOT)
    data = load_yaml(path)
    name, where = data.get("recipe", "comp"), str(path)
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() != "recipe":
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if "recipe" in data and value != data["recipe"]:  # the file's keys belong to its recipe
            raise ConfigError(
                f"--set {item}: {path} is a {data['recipe']!r} recipe; --set cannot change the "
                "recipe: start from a recipe file of that kind"
            )
        name, where = value, f"--set {item}"
    table = recipes()
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"{where}: unknown recipe {name!r}; known recipes: {', '.join(sorted(table))}")
    cfg_cls, task_cls = table[name]
    return load_config(cfg_cls, path, overrides), task_cls


def run_recipe(name_or_path: str, overrides: list[str] = ()) -> dict:
    """`cmpt train`: load the recipe, seed, build its task, run the generic trainer; returns its summary."""
    import torch

    from ..paths import expand_path
    from ..train.disk import check_run_dir
    from ..train.loop import Trainer
    from ..train.resume import check_run_dir_owner

    cfg, task_cls = load_recipe(name_or_path, list(overrides))
    cfg.run.dir = expand_path(cfg.run.dir)
    check_run_dir(Path(cfg.run.dir))  # before the task loads any model
    check_run_dir_owner(Path(cfg.run.dir))
    torch.manual_seed(cfg.run.seed)  # fresh modules (e.g. the stage-I merger) start identically on every rank
    task = task_cls(cfg)
    return Trainer(cfg.run, cfg.optim, cfg.train, task, full_config=cfg).fit()
