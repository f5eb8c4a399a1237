"""cmpt's lmms-eval models against the *installed* lmms-eval (docs/method.md §5); skipped without it.

Requests are lmms-eval's own ``Instance`` objects, the classes come out of lmms-eval's model
registry (``--model cmpt`` / ``cmpt_chat`` through the ``lmms_eval.models`` entry point), and the
slow tests run local tasks (a YAML under ``include_path``, a JSONL dataset, PNG images; no hub)
through ``simple_evaluate`` and through the ``lmms-eval`` command line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (optional)")

from lmms_eval.api.instance import Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model, get_model_manifest

import cmpt.eval.lmms_eval_plugin as plugin
from cmpt.eval.features import processor_with
from cmpt.vlm.model import VisionLanguageModel
from test_lmms_eval_plugin import build_vlm_dir, direct_scores

MAX_PIXELS = 56 * 56
CHOICES = ["red", "green", "blue"]
QUESTIONS = [("red", 0), ("green", 1), ("blue", 2), ("red", 1), (None, 2)]  # (image colour, gold)
TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_choice(doc):
    return {choices!r}
"""


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_vlm_dir(tmp_path_factory.mktemp("lmms_installed"))


@pytest.fixture(scope="module")
def reference(vlm_dir):
    """The same VLM and processor as ``--model_args pretrained=DIR,max_pixels=...``, loaded apart."""
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    return model, processor_with(model.processor, MAX_PIXELS)


def make_model(vlm_dir: Path, name: str = "cmpt"):
    args = f"pretrained={vlm_dir},max_pixels={MAX_PIXELS},batch_size=2"
    return get_model(name).create_from_arg_string(args, {"batch_size": None, "device": "cpu"})


def write_task(root: Path, kind: str) -> tuple[Path, list[dict]]:
    """A local lmms-eval task ``cmpt_tiny_<kind>`` (``mc``: multiple choice, ``gen``: generation)."""
    data, task_dir = root / "data", root / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(exist_ok=True)
    docs = []
    for i, (colour, gold) in enumerate(QUESTIONS):
        path = ""
        if colour:
            path = str(data / f"{i}.png")
            Image.new("RGB", (60 + 10 * i, 50), colour).save(path)
        question = "What colour is the image?" if colour else "Name a colour."
        docs.append({"image": path, "question": question, "answer": gold})
    (data / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "utils.py").write_text(TASK_UTILS.format(choices=CHOICES))
    head = [
        f"task: cmpt_tiny_{kind}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {data / 'docs.jsonl'}}}",
        f"  cache_dir: {root / 'hf_cache'}",
        "test_split: test",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: question",
        "doc_to_target: answer",
    ]
    if kind == "mc":
        body = ["output_type: multiple_choice", "doc_to_choice: !function utils.doc_to_choice"]
        body += ["metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    else:
        body = ["output_type: generate_until", "generation_kwargs:", "  max_new_tokens: 4"]
        body += ['  until: ["zzz"]', "metric_list:", "  - metric: exact_match"]
    (task_dir / f"cmpt_tiny_{kind}.yaml").write_text("\n".join(head + body) + "\n")
    return task_dir, docs


def docs_images(doc: dict) -> list[Image.Image] | None:
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else None


# --------------------------------------------------------------------------- registry and imports
def test_registry_resolves_cmpt_and_cmpt_chat():
    simple, chat = get_model("cmpt"), get_model("cmpt_chat")
    assert simple is plugin.CmptLMMS and chat is plugin.CmptChatLMMS
    assert issubclass(simple, lmms) and issubclass(chat, lmms)
    assert get_model_manifest("cmpt").simple_class_path == plugin.CLASS_PATH
    assert get_model_manifest("cmpt_chat").chat_class_path == plugin.CHAT_CLASS_PATH
    assert plugin.HAS_LMMS_EVAL


def test_import_failure_in_cmpt_surfaces_its_cause(vlm_dir, monkeypatch):
    """A cmpt module that fails to import is named in the error lmms-eval raises, not 'not found'."""
    monkeypatch.setitem(sys.modules, "cmpt.eval.features", None)  # its import now fails
    cls = get_model("cmpt")
    with pytest.raises(ImportError, match=r"cmpt\.eval\.features"):
        cls.create_from_arg_string(f"pretrained={vlm_dir}")


def test_broken_lmms_eval_is_not_a_silent_fallback(monkeypatch):
    """lmms-eval installed but failing to import: its own error, never an ``object`` base class."""
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)
    try:
        with pytest.raises(ImportError, match=r"lmms_eval\.api\.model"):
            importlib.reload(plugin)
    finally:
        monkeypatch.undo()
        importlib.reload(plugin)
    assert plugin.HAS_LMMS_EVAL and issubclass(plugin.CmptLMMS, lmms)


# --------------------------------------------------------------------------- model API
def test_loglikelihood_instances_match_direct_computation(vlm_dir, reference, tmp_path):
    lm = make_model(vlm_dir)
    assert isinstance(lm, lmms) and lm.batch_size == 2
    _, docs = write_task(tmp_path, "mc")
    lm.task_dict = {"tiny": {"test": dict(enumerate(docs))}}
    reqs = [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], f" {choice}", docs_images, doc_id, "tiny", "test"),
            idx=c,
            metadata={"task": "tiny", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
        for c, choice in enumerate(CHOICES)
    ]
    answers = lm.loglikelihood(reqs)
    model, proc = reference
    for req, answer in zip(reqs, answers):
        context, cont, _, doc_id = req.args[:4]
        logprob, greedy, _ = direct_scores(model, proc, docs_images(docs[doc_id]), context, cont.lstrip())
        nll, is_greedy = answer
        assert nll == pytest.approx(-logprob, abs=1e-4) and is_greedy == greedy
        # what lmms-eval's evaluator stores: the pair itself, not its text
        assert unwrap_generation_output(answer)[0] == (nll, is_greedy)


# --------------------------------------------------------------------------- evaluator and CLI
@pytest.fixture
def evaluator(monkeypatch):
    ev = importlib.import_module("lmms_eval.evaluator")
    if importlib.util.find_spec("filelock._api") is None:
        # lmms-eval 0.7.x patches filelock 3's private ``filelock._api`` in every simple_evaluate
        # call (for concurrent dataset loads across ranks); filelock 4 has no such module.
        monkeypatch.setattr(ev._enable_reentrant_filelocks, "_patched", True, raising=False)
    return ev


@pytest.mark.slow
def test_simple_evaluate_local_multiple_choice_task(vlm_dir, reference, evaluator, tmp_path):
    from lmms_eval.tasks import TaskManager

    task_dir, docs = write_task(tmp_path, "mc")
    out = evaluator.simple_evaluate(
        model="cmpt",
        model_args=f"pretrained={vlm_dir},max_pixels={MAX_PIXELS}",
        tasks=["cmpt_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=2,
        bootstrap_iters=0,
        log_samples=True,
    )
    model, proc = reference
    acc = acc_norm = 0.0
    samples = sorted(out["samples"]["cmpt_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for sample, doc in zip(samples, docs):
        lps = [direct_scores(model, proc, docs_images(doc), doc["question"], c)[0] for c in CHOICES]
        nlls = [nll for nll, _ in sample["filtered_resps"]]
        assert nlls == pytest.approx([-lp for lp in lps], abs=1e-4)
        best = max(range(len(CHOICES)), key=lambda i: lps[i])
        best_norm = max(range(len(CHOICES)), key=lambda i: lps[i] / len(" " + CHOICES[i]))
        acc += (best == doc["answer"]) / len(docs)
        acc_norm += (best_norm == doc["answer"]) / len(docs)
    result = out["results"]["cmpt_tiny_mc"]
    assert result["acc,none"] == pytest.approx(acc) and result["acc_norm,none"] == pytest.approx(acc_norm)


@pytest.mark.slow
def test_simple_evaluate_chat_model_local_generation_task(vlm_dir, reference, evaluator, tmp_path):
    from lmms_eval.tasks import TaskManager

    task_dir, docs = write_task(tmp_path, "gen")
    lm = make_model(vlm_dir, "cmpt_chat")
    assert lm.is_simple is False
    out = evaluator.simple_evaluate(
        model=lm,
        tasks=["cmpt_tiny_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    model, proc = reference
    samples = sorted(out["samples"]["cmpt_tiny_gen"], key=lambda s: s["doc_id"])
    items = [(docs_images(d), ("<image>\n" if d["image"] else "") + d["question"]) for d in docs]
    expected = model.generate_batch(items, processor=proc, max_new_tokens=4)
    assert [s["resps"][0][0] for s in samples] == expected
    assert "exact_match,none" in out["results"]["cmpt_tiny_gen"]


CLI = """
import sys
import importlib.util
import lmms_eval.evaluator as ev
if importlib.util.find_spec("filelock._api") is None:  # see the evaluator fixture
    ev._enable_reentrant_filelocks._patched = True
from lmms_eval.cli.dispatch import main
sys.argv[0] = "lmms-eval"
main()
"""


@pytest.mark.slow
def test_command_line_runs_the_readme_command(vlm_dir, tmp_path):
    """``lmms-eval --model cmpt --model_args pretrained=DIR --tasks T --include_path D`` (the
    console script's own entry function, run in a fresh process)."""
    pytest.importorskip("pytablewriter", reason="lmms-eval's result table needs pytablewriter")
    task_dir, _ = write_task(tmp_path, "mc")
    args = ["--model", "cmpt", "--model_args", f"pretrained={vlm_dir},max_pixels={MAX_PIXELS}"]
    args += ["--tasks", "cmpt_tiny_mc", "--include_path", str(task_dir), "--batch_size", "2"]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|cmpt_tiny_mc")]
    assert table and "|acc" in table[0], proc.stdout[-3000:]
    assert "Error during evaluation" not in proc.stdout + proc.stderr
