"""An attention backend the run's device cannot use is refused before anything is built: one line
naming the key (``model.attn``, ``model.vit_attn``, ``--attn``), why, and what works; exit 2. The
check and the runtime error of ``varlen_attention`` share one rule (``backend_problem``)."""

from __future__ import annotations

import pytest
import torch

from cmpt.cli import main
from cmpt.vision import attention as A
from cmpt.vision.attention import BackendUnavailableError, backend_problem, build_plan, check_backend


@pytest.fixture
def kernels(monkeypatch):
    """Both kernel backends installed (whatever this machine has)."""
    monkeypatch.setattr(A, "flash_available", lambda: True)
    monkeypatch.setattr(A, "torch_varlen_available", lambda: True)


def _train_device(monkeypatch, kind: str) -> None:
    """The device ``cmpt.train.distributed.world_info`` trains on: CUDA when torch sees a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_auto_sdpa_flex_always_pass(device_type):
    for backend in ("auto", "sdpa", "flex"):
        assert backend_problem(backend, device_type, half=False) is None
        check_backend(backend, device_type, key="model.attn")


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_kernel_backends_need_cuda_half_and_their_package(kernels, monkeypatch, backend):
    assert backend_problem(backend, "cuda", half=True) is None
    assert backend_problem(backend, "cuda", half=None) is None  # dtype not known yet: not refused
    assert "the compute dtype is not float16/bfloat16" in backend_problem(backend, "cuda", half=False)
    assert "the device is cpu" in backend_problem(backend, "cpu", half=True)
    probe = {"flash": "flash_available", "varlen": "torch_varlen_available"}[backend]
    monkeypatch.setattr(A, probe, lambda: False)
    missing = {"flash": "flash-attn is not installed", "varlen": "lacks it"}[backend]
    assert backend_problem(backend, "cuda", half=True).endswith(f"{missing})")  # the only reason here


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_check_and_runtime_error_share_the_rule(kernels, backend):
    """The same rule: flash-attn installed does not make 'flash' run on the CPU, at either point."""
    problem = backend_problem(backend, "cpu", half=False)
    with pytest.raises(BackendUnavailableError) as err:
        check_backend(backend, "cpu", key="model.attn")
    assert isinstance(err.value, ValueError) and not isinstance(err.value, RuntimeError)
    msg = str(err.value)
    assert msg.startswith(f"model.attn={backend}: ") and msg.endswith("; use auto, sdpa or flex here")
    assert "\n" not in msg
    with pytest.raises(RuntimeError) as err:
        build_plan([4], backend, torch.device("cpu"), torch.float32)
    assert str(err.value).startswith(problem)
    assert build_plan([4], "auto", torch.device("cpu"), torch.bfloat16).backend == "sdpa"


def test_unknown_backend_is_a_check_error():
    with pytest.raises(BackendUnavailableError, match=r"^--attn='xformers': unknown attention backend"):
        check_backend("xformers", "cpu", key="--attn")


def _refused(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2, err  # the line, then the --debug hint
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_train_refuses_before_building(tmp_path, monkeypatch, capsys, backend):
    """Nothing exists behind the recipe's paths: the attention check comes before any of them is read."""
    _train_device(monkeypatch, "cpu")
    sets = ["model.vision=/nonexistent/vit", "model.llm=/nonexistent/lm", f"run.dir={tmp_path / 'run'}"]
    argv = ["train", "tiny/comp_stage1", "--set", f"model.attn={backend}"]
    for s in sets:
        argv += ["--set", s]
    _refused(capsys, argv, f"cmpt train: error: model.attn={backend}: ", "the device is cpu", "use auto")
    assert not (tmp_path / "run").exists()


def test_moca_refuses_vit_attn_before_reading_model_init(tmp_path, monkeypatch, capsys):
    _train_device(monkeypatch, "cpu")
    argv = ["train", "tiny/moca_cpt", "--set", "model.vit_attn=flash", "--set", "model.init=/nonexistent/vlm"]
    _refused(capsys, [*argv, "--set", f"run.dir={tmp_path / 'run'}"], "model.vit_attn=flash: ", "flash-attn")


def test_train_check_follows_the_training_device(kernels, monkeypatch):
    """A GPU run with the kernel installed passes the check; the same config on the CPU does not."""
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import load_model

    cfg, _ = load_recipe("tiny/comp_stage1", ["model.attn=flash", "model.vision=/nonexistent/vit"])
    _train_device(monkeypatch, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"model\.attn=flash"):
        load_model(cfg)
    _train_device(monkeypatch, "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(FileNotFoundError, match="/nonexistent/vit"):  # past the check: the missing tower
        load_model(cfg)
    cfg.train.precision = "fp32"  # the same GPU run without bf16 autocast: the kernels need half precision
    with pytest.raises(BackendUnavailableError, match=r"model\.attn=flash: .*compute dtype is not float16"):
        load_model(cfg)


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_encode_refuses_before_loading(tmp_path, capsys, backend):
    """The model does not exist: the check comes first, and no progress bar is drawn."""
    argv = ["encode", "--model", str(tmp_path / "no-model"), str(tmp_path / "x.png"), "--out", "f.st"]
    err = _refused(capsys, [*argv, "--attn", backend, "--device", "cpu"], f"--attn={backend}: ", "is cpu")
    assert "%" not in err
