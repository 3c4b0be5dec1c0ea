#!/usr/bin/env bash
# The exactness tests (pytest -m exactness: equal tokens, argmaxes or weights from two computations) under other CPU
# kernels than this machine picks, each kernel set in its own process, so that a near-tie that only another CPU would
# flip shows here. Exits non-zero if any run fails. docs/testing.md has the last results.
#
#   tests/exactness_kernels.sh                      # every exactness test, six kernel sets
#   tests/exactness_kernels.sh tests/test_steer.py  # extra arguments go to pytest
#
# ATEN_CPU_CAPABILITY picks PyTorch's own vectorised kernels (log-softmax, layer norm, exp, ...; "default" is plain
# C++), ONEDNN_MAX_CPU_ISA caps oneDNN's, MKL_CBWR=COMPATIBLE makes MKL's matrix products take their SSE2 code path,
# and the last set caps all three libraries at AVX2, as on a CPU without AVX-512.
set -u
cd "$(dirname "$0")/.."

settings=("" "ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" "ONEDNN_MAX_CPU_ISA=AVX2" "MKL_CBWR=COMPATIBLE"
          "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2")
failed=()
for setting in "${settings[@]}"; do
    name=${setting:-"this machine's own kernels"}
    # $setting unquoted on purpose: empty, or VAR=value words for env.
    kernels=$(env $setting python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
    echo "=== $name: torch.backends.cpu.get_cpu_capability() = $kernels"
    if ! env $setting python -m pytest -q -m exactness "$@"; then
        failed+=("$name")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    printf 'exactness tests FAILED under: %s\n' "${failed[@]}"
    exit 1
fi
echo "exactness tests passed under all ${#settings[@]} kernel sets"
