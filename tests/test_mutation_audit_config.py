"""Behaviours pinned by a mutation audit (round 3) of the configuration modules (``cmpt.config``,
``cmpt.config_schema``, ``cmpt.config_files``: YAML recipes, ``--set`` overrides, moved keys).

Each test was written against a single-point mutant of the source (a flipped comparison, a dropped
condition, a changed default, ...) that the rest of the suite let through: it passes on the code as
it is and fails on that mutant. Each docstring names the module and the line or behaviour it guards.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

import cmpt.config_schema as config_schema
from cmpt.config import ConfigError, config_hash, deep_merge, load_config, resolve_config_path, to_dict


# ----------------------------------------------------------------------------- config schemas
class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass
class MOptim:
    lr: float = 1e-3
    warmup: int = 0


@dataclass
class MEma:
    decay: float = 0.9


@dataclass
class MTrain:
    _moved_keys = (("learning_rate", "optim.lr"), ("gone", "optim.nothing"))

    steps: int = 10


@dataclass
class MRoot:
    name: str = ""
    out: Path = Path("runs")
    train: MTrain = field(default_factory=MTrain)
    optim: MOptim | None = field(default_factory=MOptim)
    ema: MEma | None = None
    level: Literal[0, 1, 2] = 0
    mode: Mode = Mode.FAST
    losses: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "a")
    tag: str | int = ""
    either: int | str = 0


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def fresh_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moved-key warnings are once per process: start each test with none given yet."""
    monkeypatch.setattr(config_schema, "_WARNED_MOVES", set())


# ----------------------------------------------------------------------------- moved keys
def test_moved_key_in_a_file_is_read_at_its_new_place(fresh_moves) -> None:
    """config.py:91-113 (_migrate_moved): an old key is moved to its new path with a FutureWarning,
    also into a section the file left at ``null`` (line 96: ``target.get(part) is None``)."""
    with pytest.warns(FutureWarning, match="'train.learning_rate'.*read as 'optim.lr'"):
        cfg = load_config(MRoot, {"optim": None, "train": {"learning_rate": 0.5, "steps": 3}})
    assert cfg.optim == MOptim(lr=0.5) and cfg.train.steps == 3


def test_moved_key_without_a_new_home_is_refused(fresh_moves) -> None:
    """config.py:91 (``_schema_type(cls, parts) is None``): a moved key whose new path is not in the
    schema is left in place, so the error says it moved (not 'unknown key optim.nothing')."""
    with pytest.raises(ConfigError, match=r"'train\.gone'.*this key moved to 'optim\.nothing'"):
        load_config(MRoot, {"train": {"gone": 1}})


def test_moved_key_and_its_new_key_must_agree(fresh_moves) -> None:
    """config.py:104: old and new key both set: equal values are accepted, different ones refused."""
    with pytest.warns(FutureWarning):
        cfg = load_config(MRoot, {"optim": {"lr": 0.25}, "train": {"learning_rate": 0.25}})
    assert cfg.optim.lr == 0.25
    with pytest.raises(ConfigError, match=r"also set .* to a different value; remove 'train\.learning_rate'"):
        load_config(MRoot, {"optim": {"lr": 0.5}, "train": {"learning_rate": 0.25}})


def test_moved_key_error_names_the_file_that_set_it(tmp_path: Path, fresh_moves) -> None:
    """config.py:112 (origins of the moved value): a bad value under the old key, set in a base
    file, is reported as coming from that base file, not from the child."""
    base = _yaml(tmp_path / "base.yaml", {"train": {"learning_rate": "fast"}})
    child = _yaml(tmp_path / "child.yaml", {"base": "base.yaml", "name": "x"})
    with pytest.raises(ConfigError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        load_config(MRoot, child)
    assert f"'optim.lr' (from {base})" in str(e.value)


def test_moved_key_warns_once_per_process(fresh_moves) -> None:
    """config_schema.py:101: the deprecation warning is given once, not at every load."""
    with pytest.warns(FutureWarning):
        load_config(MRoot, {"train": {"learning_rate": 0.5}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert load_config(MRoot, {"train": {"learning_rate": 0.5}}).optim.lr == 0.5


def test_set_of_a_moved_key_and_of_a_key_below_it(fresh_moves) -> None:
    """config.py:181-186: ``--set train.learning_rate=X`` sets ``optim.lr``; a deeper key under the
    old name (``train.learning_rate.x``) is not silently read as the moved key."""
    with pytest.warns(FutureWarning):
        assert load_config(MRoot, None, ["train.learning_rate=0.5"]).optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rate'"):
        load_config(MRoot, None, ["train.learning_rate.x=0.5"])


# ----------------------------------------------------------------------------- --set values
def test_set_accepts_one_override_as_a_string() -> None:
    """config.py:232: ``overrides`` given as one string is one override, not its characters."""
    assert load_config(MRoot, None, "name=x").name == "x"


def test_set_path_key_takes_the_text_as_written() -> None:
    """config.py:124 (``_is_text_type`` covers Path): ``--set out=2024`` and ``out={cache}/x`` are
    paths, not a YAML number or flow mapping."""
    cfg = load_config(MRoot, None, ["out=2024", "name={cache}/x"])
    assert cfg.out == Path("2024") and cfg.name == "{cache}/x"
    assert load_config(MRoot, None, ["out={cache}/x"]).out == Path("{cache}/x")


def test_set_unterminated_quote_on_a_text_key_is_kept() -> None:
    """config.py:141-142: a text value that starts with a quote but is not valid YAML is taken as
    written instead of failing as invalid YAML."""
    assert load_config(MRoot, None, ["name='abc"]).name == "'abc"


def test_set_dict_entry_uses_the_dicts_value_type() -> None:
    """config.py:193 (``child_tp = args[1]``): ``--set tags.year=2024`` on a ``dict[str, str]`` is the
    text '2024', and on a ``dict[str, float]`` a number."""
    cfg = load_config(MRoot, None, ["tags.year=2024", "losses.lm=0.5"])
    assert cfg.tags == {"year": "2024"} and cfg.losses == {"lm": 0.5}


def test_set_fixed_tuple_item_uses_its_own_type() -> None:
    """config.py:198-199: an item of a fixed-length tuple ``tuple[int, str]`` is typed by its
    position: ``pair.1=2024`` is the str '2024'."""
    assert load_config(MRoot, None, ["pair.1=2024", "pair.0=7"]).pair == (7, "2024")


def test_set_union_with_text_first_is_parsed_as_yaml() -> None:
    """config_schema.py:266 (``_unwrap_optional`` only unwraps ``X | None``): ``str | int`` is not a
    text key, so ``--set tag=5`` is the int 5 (YAML's reading)."""
    assert load_config(MRoot, None, ["tag=5"]).tag == 5


def test_set_error_names_the_override_not_the_file(tmp_path: Path) -> None:
    """config.py:209 (the value is checked when the override is applied): a bad value in
    ``--set optim={lr: fast}`` is reported as from that override, even where the file set optim.lr."""
    src = _yaml(tmp_path / "r.yaml", {"optim": {"lr": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(MRoot, src, ["optim={lr: fast}"])
    assert "(from --set optim={lr: fast})" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- value checks
@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"train": {"steps": True}}, "expected int, got True"),
        ({"level": True}, "expected one of 0, 1, 2, got True"),
        ({"level": 1.0}, "expected one of 0, 1, 2, got 1.0"),
        ({"losses": {True: 1.0}}, "expected str, got True"),
        ({"either": None}, "expected int | str, got None"),
    ],
)
def test_values_that_only_look_alike_are_refused(data: dict, fragment: str) -> None:
    """config_schema.py:187 (a bool is not an int), :133 (a Literal matches by type too: True is not
    1, 1.0 is not 1), :166 (a YAML ``true:`` key is not the str key 'True'), :117 (None only for a
    union that allows it)."""
    with pytest.raises(ConfigError) as e:
        load_config(MRoot, data)
    assert fragment in str(e.value)


def test_enum_accepts_its_member_names_and_writes_values() -> None:
    """config_schema.py:140 (an enum accepts a member's name) and config.py:263 (``to_dict`` writes
    an enum's value, so the saved YAML reads ``safe``, not ``SAFE``)."""
    cfg = load_config(MRoot, {"mode": "SAFE"})
    assert cfg.mode is Mode.SAFE and to_dict(cfg)["mode"] == "safe"


def test_section_given_as_a_dataclass_instance() -> None:
    """config_schema.py:222: a section passed (in a dict source) as an instance of its dataclass is
    taken as it is."""
    assert load_config(MRoot, {"optim": MOptim(lr=0.5, warmup=2)}).optim == MOptim(0.5, 2)


def test_optional_section_error_is_the_precise_one() -> None:
    """config_schema.py:123-124: a value for ``Section | None`` is checked as the section itself,
    so a typo gets 'did you mean', not a bare 'expected MEma | None'."""
    with pytest.raises(ConfigError, match=r"'ema\.decayy'.*did you mean 'ema\.decay'"):
        load_config(MRoot, {"ema": {"decayy": 0.5}})


def test_key_origin_is_the_most_specific_one(tmp_path: Path) -> None:
    """config_schema.py:46 (``_Ctx.where`` looks up the longest key prefix first): a bad value from
    a base file is named with that file even when the child file sets other keys of its section."""
    base = _yaml(tmp_path / "base.yaml", {"optim": {"lr": "fast"}})
    child = _yaml(tmp_path / "child.yaml", {"base": "base.yaml", "optim": {"warmup": 1}})
    with pytest.raises(ConfigError) as e:
        load_config(MRoot, child)
    assert f"'optim.lr' (from {base})" in str(e.value)


def test_config_hash_ignores_mapping_order() -> None:
    """config.py:290 (``sort_keys=True``): the same config with its ``dict`` entries in another
    order has the same hash."""
    a = load_config(MRoot, {"losses": {"lm": 1.0, "align": 0.5}})
    b = load_config(MRoot, {"losses": {"align": 0.5, "lm": 1.0}})
    assert config_hash(a) == config_hash(b)
    assert config_hash({"x": 1, "y": 2}) == config_hash({"y": 2, "x": 1})


def test_deep_merge_dict_over_a_non_dict_replaces_it(tmp_path: Path) -> None:
    """config_files.py:26 (merge only when both sides are dicts): a child file's section over a
    base's ``null`` or scalar replaces it."""
    assert deep_merge({"a": None, "b": 1}, {"a": {"x": 1}, "b": {"y": 2}}) == {"a": {"x": 1}, "b": {"y": 2}}
    _yaml(tmp_path / "base.yaml", {"ema": None})
    child = _yaml(tmp_path / "child.yaml", {"base": "base.yaml", "ema": {"decay": 0.5}})
    assert load_config(MRoot, child).ema == MEma(0.5)


def test_base_given_as_a_path_object(tmp_path: Path) -> None:
    """config_files.py:45 (``base`` may be a ``PurePath``): a dict source naming its base with a
    ``Path`` (Python API) is merged like a string one."""
    base = _yaml(tmp_path / "b.yaml", {"name": "from-base", "train": {"steps": 4}})
    cfg = load_config(MRoot, {"base": base, "name": "mine"})
    assert cfg.name == "mine" and cfg.train.steps == 4


def test_packaged_recipe_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config_files.py:121-143 (``resolve_config_path``): a local file wins over a packaged recipe of
    the same name; a packaged ``.yml`` is found by its full name; the 'did you mean' hint compares
    names without the ``.yaml`` the user typed."""
    root = tmp_path / "configs"
    root.mkdir()
    packaged = _yaml(root / "r.yaml", {"name": "packaged"})
    yml = _yaml(root / "other.yml", {"name": "yml"})
    _yaml(root / "abc.yaml", {})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert resolve_config_path("r.yaml", root) == packaged
    local = _yaml(work / "r.yaml", {"name": "local"})
    assert resolve_config_path("r.yaml", root).resolve() == local
    assert resolve_config_path("other.yml", root) == yml
    with pytest.raises(ConfigError, match="did you mean 'abc'"):
        resolve_config_path("ab.yaml", root)
