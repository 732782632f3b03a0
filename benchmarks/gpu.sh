#!/usr/bin/env bash
# The CUDA tables in one command (52 cases in quick mode, sized to finish well within 10 minutes on one GPU):
# CUDA-event times and torch.cuda.max_memory_allocated peaks of the blocks against their
# baselines, the attention core's bandwidth as a fraction of the device's peak, and the
# projections' batched matmul against F.conv3d. Then the report, in OUT/benchmarks.md.
#
#   benchmarks/gpu.sh [OUT] [--overwrite] [--dry-run]      (OUT default: benchmark-report-cuda)
#
# Needs the project installed with the test extra (pip install -e '.[test]') and a CUDA device.
# SLICEATTN_PEAK_GBPS overrides the peak bandwidth read from the device's properties.
set -euo pipefail
cd "$(dirname "$0")/.."

out="benchmark-report-cuda"
overwrite=()
dry_run=0
for arg in "$@"; do
    case "$arg" in
        --overwrite) overwrite=(--overwrite) ;;
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $arg (options: --overwrite, --dry-run)" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
json="$out.json"
python=${PYTHON:-python}

bench=("$python" -m pytest benchmarks/test_bench_cuda.py --benchmark-only "--benchmark-json=$json" -q -p no:cacheprovider)
report=("$python" benchmarks/report.py "$json" --out "$out" --overwrite)
if [[ $dry_run -eq 1 ]]; then
    echo "${bench[*]}"
    echo "${report[*]}"
    exit 0
fi

# refuse before any long work: no torch, no CUDA device, or results that would be replaced
if ! torch_version=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "error: $python cannot import torch; activate the environment where the project is installed (pip install -e '.[test]')" >&2
    exit 2
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: benchmarks/gpu.sh needs a CUDA device, and torch.cuda.is_available() is False here (torch $torch_version);" \
         "on a CPU machine run: pytest --benchmark-only" >&2
    exit 2
fi
if [[ ${#overwrite[@]} -eq 0 && ( -e "$json" || -e "$out/benchmarks.md" ) ]]; then
    echo "error: $json or $out/benchmarks.md exists; pass --overwrite to replace them, or give another OUT" >&2
    exit 2
fi
"${bench[@]}"
"${report[@]}"
