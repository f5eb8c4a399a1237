#!/usr/bin/env bash
# Every GPU check and benchmark of cmpt in one call on a lent GPU machine (issue 14; docs/benchmarks.md
# "On a lent device"): the CoMP and MoCa step benchmarks (the issue's figures first), the GPU tests,
# then one table of both benchmarks.
#
#   bash benchmarks/device_session.sh            # one H200: at most ~9.7 min (the timeouts below)
#   SMOKE=1 bash benchmarks/device_session.sh    # the same steps on tiny shapes, on the CPU too
#
# Runs from the repository root with the machine's own python3 (PYTHON=... to choose) and the
# working tree's src/ on PYTHONPATH: nothing is installed, except wheels found in .whl/ (e.g.
# liger-kernel, for the fused-CE variants, where the machine cannot reach a registry), which go to
# a private target. Budgets (seconds; a benchmark starts no variant after its budget and is killed
# at its timeout): TEST_TIMEOUT, COMP_BUDGET / COMP_TIMEOUT, MOCA_BUDGET / MOCA_TIMEOUT. TESTS: the
# test files to run (default: the GPU tests and the files holding CUDA cases).
# Output: one log per step and summary.json in $OUT (default ./device-out); exit 1 if a step failed.
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cmpt-wheels .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/cmpt-wheels
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export CMPT_TEST_DEVICE=cuda TOKENIZERS_PARALLELISM=false
smoke=${SMOKE:+--smoke}
failed=()

step() {  # step NAME TIMEOUT CMD...: run CMD under a timeout, its output to the screen and $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step env 20 "$py" -c "
import torch, transformers, importlib.util as u
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
print('transformers', transformers.__version__, '| triton', u.find_spec('triton') is not None, '| liger', u.find_spec('liger_kernel') is not None)
"
step comp "${COMP_TIMEOUT:-190}" "$py" benchmarks/bench_comp_gpu.py --budget-s "${COMP_BUDGET:-140}" $smoke
step moca "${MOCA_TIMEOUT:-250}" "$py" benchmarks/bench_moca_gpu.py --budget-s "${MOCA_BUDGET:-190}" $smoke
# shellcheck disable=SC2086  # TESTS: a list of paths
step tests "${TEST_TIMEOUT:-120}" "$py" -m pytest -v -p no:cacheprovider -m "not slow" \
  ${TESTS:-tests/test_cuda_train.py tests/test_attention.py tests/test_varlen_op.py tests/test_vit.py tests/test_fused_ce.py}

"$py" - "$out" <<'EOF'
"""One table of both benchmarks (their last JSON lines) and summary.json."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for name in ("comp", "moca"):
    log = out / f"{name}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    last = next((line for line in reversed(lines) if line.startswith("{")), None)
    summary[name] = json.loads(last) if last else {"missing": f"no JSON line in {log}"}
print(f"{'bench':<6} {'variant':<22} {'step ms':>9} {'MFU':>7} {'x base':>7} {'GiB':>6}")
for name, fig in summary.items():
    for variant, ms in fig.get("step_ms", {}).items():
        mfu, gib = fig["mfu"].get(variant), fig["peak_mem_gib"].get(variant)
        print(
            f"{name:<6} {variant:<22} {ms:9.1f} {'' if mfu is None else f'{100 * mfu:.1f}%':>7} "
            f"{fig['speedup_vs_baseline'].get(variant) or float('nan'):7.3f} {gib or float('nan'):6.1f}"
        )
    for variant, why in fig.get("not_run", {}).items():
        print(f"{name:<6} {variant:<22} {why}")
    if "missing" in fig:
        print(f"{name:<6} {fig['missing']}")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]} (logs in $out)"
  exit 1
fi
