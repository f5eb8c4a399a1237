#!/usr/bin/env bash
# Every GPU check and benchmark of cmpt in one call on a lent GPU machine (issue 14; docs/benchmarks.md
# "On a lent device"): the CoMP and MoCa step benchmarks (the figures first), where their
# micro-batches make the host wait for the GPU (sync_audit.py), the GPU tests, then one table of both
# benchmarks.
#
#   bash benchmarks/device_session.sh            # one H200: at most ~9.4 min (the timeouts below)
#   SMOKE=1 bash benchmarks/device_session.sh    # the same steps on tiny shapes, on the CPU too
#
# Runs from the repository root with the machine's own python3 (PYTHON=... to choose) and the
# working tree's src/ on PYTHONPATH: nothing is installed, except wheels found in .whl/ (e.g.
# liger-kernel, for the fused-CE variants, where the machine cannot reach a registry), which go to
# a private target.
#
# Time (seconds; the call's limit is 600): env 15 + comp 200 + moca 200 + syncs 45 + tests 100 = 560, plus
# ~5 for the wheels and ~1 for the summary. A benchmark starts no variant after its *_BUDGET, is
# told its kill time (*_TIMEOUT less 15 s of interpreter start-up: --timeout-s), so it starts a
# compiled group only with >= 120 s left, and prints its figures after every variant, so a kill
# keeps what ran. BENCH_ARGS: the benchmarks' sizes (default 3 micro-batches, 6 timed steps).
# Tests: only those marked `gpu` (they skip without CUDA), kernel-parity files first,
# the trainer's (tests/test_cuda_train.py) last, TEST_EACH s per test (pytest-timeout, where
# installed). TESTS: the test files. A step whose timeout is 0 is left out.
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
sizes="--batches 3 --steps 6"
bench_args=${BENCH_ARGS-$sizes}
failed=()

step() {  # step NAME TIMEOUT CMD...: run CMD under a timeout, its output to the screen and $out/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 0 ]; then
    echo "=== $name: left out (timeout 0)"
    return
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

bench() {  # bench NAME SCRIPT TIMEOUT BUDGET
  local limit=$3
  # shellcheck disable=SC2086  # bench_args, smoke: lists of flags
  step "$1" "$limit" "$py" "$2" --budget-s "$4" --timeout-s $((limit > 30 ? limit - 15 : limit)) $bench_args $smoke
}

step env 15 "$py" -c "
import torch, transformers, importlib.util as u
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
print('transformers', transformers.__version__, '| triton', u.find_spec('triton') is not None, '| liger', u.find_spec('liger_kernel') is not None)
"
bench comp benchmarks/bench_comp_gpu.py "${COMP_TIMEOUT:-200}" "${COMP_BUDGET:-145}"
bench moca benchmarks/bench_moca_gpu.py "${MOCA_TIMEOUT:-200}" "${MOCA_BUDGET:-145}"
# shellcheck disable=SC2086  # smoke: a flag or nothing
step syncs "${SYNC_TIMEOUT:-45}" "$py" benchmarks/sync_audit.py $smoke

# the GPU tests: those marked `gpu` (the CPU ones of the same files would spend the step: e.g.
# tests/test_varlen_op.py's gradchecks)
per_test=()
if "$py" -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout "${TEST_EACH:-45}")
fi
# shellcheck disable=SC2086  # TESTS: a list of paths
step tests "${TEST_TIMEOUT:-100}" "$py" -m pytest -v -p no:cacheprovider -m "gpu and not slow" "${per_test[@]}" \
  ${TESTS:-tests/test_attention.py tests/test_varlen_op.py tests/test_vit.py tests/test_fused_ce.py tests/test_mrope.py tests/test_host_tensor.py tests/test_sync_free.py tests/test_cuda_train.py}

"$py" benchmarks/device_summary.py "$out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]} (logs in $out)"
  exit 1
fi
