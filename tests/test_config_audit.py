"""Config audit regressions (cmpt.config, cmpt.config_schema, cmpt.recipes.load_recipe): user
mistakes in YAML recipes and ``--set`` get one clear line naming the file / key / value, and
nothing is silently read as something else than what was written.

* ``--set section={a: 1}`` merges into the section, as a ``base:`` child file does (it used to
  reset the section's other keys to the class defaults, dropping the recipe's values);
* ``--set`` of a text key keeps ``#`` and ``&`` as written (YAML read ``exp #2`` as ``exp``);
* float keys refuse NaN and infinities (``lr >= 0``-style checks let NaN through);
* a YAML key given twice is an error (PyYAML keeps the last silently);
* YAML syntax errors and non-UTF-8 files are one line naming the file;
* a directory as the recipe or as a ``base:``, a missing base: named as such, with the path tried;
* ``recipe:`` that is not a string, or ``--set recipe=...`` against the file's recipe, is a
  ConfigError (a list crashed with ``TypeError: unhashable type``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmpt.cli import main
from cmpt.config import ConfigError, load_config, resolve_config_path
from cmpt.recipes import load_recipe


@dataclass
class Inner:
    size: int = 1
    mode: str = "a"


@dataclass
class Section:
    steps: int = 100
    every: int = 0
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Root:
    name: str = ""
    lr: float = 1e-4
    section: Section = field(default_factory=Section)
    opt: Section | None = None


def _file(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- --set values
def test_set_section_mapping_merges_into_the_files_values(tmp_path: Path) -> None:
    src = _file(
        tmp_path / "r.yaml",
        "section: {steps: 150, every: 75, inner: {size: 3, mode: b}, weights: {x: 1, y: 2}}\n",
    )
    cfg = load_config(Root, src, ["section={steps: 5, inner: {size: 4}, weights: {z: 3}}"])
    assert (cfg.section.steps, cfg.section.every) == (5, 75)  # every kept, not reset to 0
    assert cfg.section.inner == Inner(size=4, mode="b")  # nested sections merge too
    assert cfg.section.weights == {"z": 3.0}  # a plain mapping value is replaced
    cfg = load_config(Root, src, ["opt={every: 2}"])  # an Optional section left at None
    assert cfg.opt == Section(every=2)


def test_set_section_mapping_merges_in_a_recipe() -> None:
    cfg, _ = load_recipe("tiny/comp_stage1", ["train={steps: 5}"])
    assert (cfg.train.steps, cfg.train.save_every) == (5, 75)
    cfg, _ = load_recipe("tiny/comp_stage1", ["stage={rope: true}"])
    assert (
        cfg.stage.rope and cfg.stage.resolution.policy == "fixed" and cfg.stage.resolution.fixed_size == 112
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("exp #2", "exp #2"),
        ("#3", "#3"),
        ("&a x", "&a x"),
        ("'q #'", "q #"),
        ("yes", "yes"),
        (" 2024 ", "2024"),
    ],
)
def test_set_text_value_is_taken_as_written(raw: str, expected: str) -> None:
    assert load_config(Root, None, [f"name={raw}"]).name == expected


def test_set_text_null_still_means_none_for_optional() -> None:
    @dataclass
    class P:
        path: Path | None = Path("x")

    for raw in ("", "~", "null"):
        assert load_config(P, None, [f"path={raw}"]).path is None


# ----------------------------------------------------------------------------- float values
@pytest.mark.parametrize("raw", [".nan", "nan", "inf", "-.inf", "1e400", "1" + "0" * 400])
def test_non_finite_float_refused_from_set(raw: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Root, None, [f"lr={raw}"])
    assert "config key 'lr' (from --set lr=" in _one_line(e) and "expected a finite number" in str(e.value)


def test_non_finite_float_refused_from_yaml(tmp_path: Path) -> None:
    src = _file(tmp_path / "r.yaml", "section: {weights: {x: .inf}}\n")
    with pytest.raises(ConfigError, match=r"'section\.weights\.x' \(from .*r\.yaml\): expected a finite"):
        load_config(Root, src)
    with pytest.raises(ConfigError, match=r"optim\.lr.*expected a finite number, got nan"):
        load_recipe("tiny/comp_stage1", ["optim.lr=.nan"])


def test_int_from_huge_numeric_string() -> None:
    big = "1" + "0" * 400  # float(10**400) raised OverflowError (a traceback)
    assert load_config(Section, None, [f"steps='{big}'"]).steps == 10**400
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Section, None, ["steps='" + "9" * 400 + ".5'"])


# ----------------------------------------------------------------------------- YAML files
def test_duplicate_yaml_key_refused(tmp_path: Path) -> None:
    top = _file(tmp_path / "top.yaml", "section: {steps: 5}\nname: a\nsection: {steps: 6}\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, top)
    msg = _one_line(e)
    assert str(top) in msg and "line 3" in msg and "'section' twice (first at line 1)" in msg
    nested = _file(tmp_path / "nested.yaml", "section: {steps: 5, steps: 6}\n")
    with pytest.raises(ConfigError, match="'steps' twice"):
        load_config(Root, nested)
    # a key brought in by a YAML merge (<<) may still be overridden
    merged = _file(tmp_path / "m.yaml", "d: &d {steps: 1, every: 2}\nsection: {<<: *d, steps: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'd'"):  # reaches the schema check
        load_config(Root, merged)


def test_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    tabs = _file(tmp_path / "tabs.yaml", "section:\n\tsteps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, tabs)
    msg = _one_line(e)
    assert msg.startswith(f"invalid YAML in {tabs}: line 2, column 1") and "\\t" in msg
    broken = _file(tmp_path / "broken.yaml", "section: {steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, broken)
    assert "expected ',' or '}'" in _one_line(e)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    bad = _file(tmp_path / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(Root, bad)
    assert str(bad) in _one_line(e) and "UTF-8" in str(e.value)


def test_directory_as_recipe_or_base(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_config_path(tmp_path / "adir", tmp_path / "packaged")
    child = _file(tmp_path / "c.yaml", "base: adir\n")
    with pytest.raises(ConfigError, match=r"config file is a directory, not a YAML file: .*adir \(base of"):
        load_config(Root, child)


def test_missing_base_names_the_path_tried(tmp_path: Path) -> None:
    child = _file(tmp_path / "c.yaml", "base: tiny/comp_stage1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, child)
    assert f"not found: {tmp_path / 'tiny' / 'comp_stage1'} (base of" in _one_line(e)
    assert "relative to that file" in str(e.value)


# ----------------------------------------------------------------------------- recipe key
def test_recipe_key_that_is_not_a_name(tmp_path: Path) -> None:
    src = _file(tmp_path / "r.yaml", "recipe: [comp]\n")
    with pytest.raises(ConfigError, match=r"unknown recipe \['comp'\]; known recipes: comp, moca"):
        load_recipe(str(src))
    plain = _file(tmp_path / "plain.yaml", "train: {steps: 3}\n")  # no recipe key: --set picks one
    with pytest.raises(ConfigError, match=r"--set recipe=\[a\]: unknown recipe \['a'\]"):
        load_recipe(str(plain), ["recipe=[a]"])
    assert load_recipe(str(plain), ["recipe=comp"])[0].train.steps == 3


@pytest.mark.parametrize("value", ["[a]", "{a: 1}", "moca", "null"])
def test_set_recipe_against_the_files_recipe(value: str) -> None:
    with pytest.raises(ConfigError, match=r"is a 'comp' recipe; --set cannot change the recipe"):
        load_recipe("tiny/comp_stage1", [f"recipe={value}"])
    assert load_recipe("tiny/comp_stage1", ["recipe=comp"])[0].recipe == "comp"


def test_cli_recipe_list_is_one_line_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    argv = ["train", "tiny/comp_stage1", "--set", "recipe=[a]", "--set", f"run.dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cmpt ")]
    assert line.startswith("cmpt train: error: --set recipe=[a]: ") and not (tmp_path / "run").exists()


def test_an_unset_variable_in_a_path_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$VAR`` / ``${VAR}`` in a path expand; one that is not set is named (left as written, a run
    would write into a directory literally called ``$VAR``)."""
    from cmpt.paths import expand_path

    monkeypatch.setenv("CMPT_AUDIT_SET", "/data")
    monkeypatch.delenv("CMPT_AUDIT_UNSET", raising=False)
    assert expand_path("$CMPT_AUDIT_SET/a") == expand_path("${CMPT_AUDIT_SET}/a") == "/data/a"
    with pytest.raises(ValueError, match=r"\$CMPT_AUDIT_UNSET is not set; set it or write the path out"):
        expand_path("runs/${CMPT_AUDIT_UNSET}/x")
