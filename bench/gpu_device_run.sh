#!/usr/bin/env bash
# The GPU device check as one command, for a CUDA machine that cannot reach a package index.
#
# Prepare on a machine that can (from the repository root):
#   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude
#   maturin build --release -o .gpu                       # tunex (abi3: any CPython >= 3.10)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .gpu bitsandbytes   # the baseline's 4-bit layers
# then on the GPU machine, with .gpu/ carried along: `bash bench/gpu_device_run.sh`. Results land in
# $OUT (default ./gpu_out): gpu_check.md (the table, rewritten after each section), log.txt, env.txt.
# BUDGET (seconds, default 330) bounds everything after the install (kernels, the 13.5 GB checkpoint,
# the training runs: a run that would start later is skipped and says so), so the whole command ends
# within about BUDGET + 1 minute. RUNS overrides gpu_check.py's --runs (default: fp32 adapters + AdamW,
# then the baseline, bf16 adapters + 8-bit AdamW, bf16 + AdamW under FSDP2 in one process, bf16 +
# paged 8-bit AdamW). GPU_CHECK_PROFILE=1 adds a profile of one step.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, peft, bitsandbytes, tunex; print('tunex', tunex.__file__); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/env.txt"
python3 bench/gpu_check.py --steps "${STEPS:-5}" --budget "${BUDGET:-330}" ${RUNS:+--runs "$RUNS"} --out "$OUT/gpu_check.md" \
    > "$OUT/stdout.txt" 2> >(tee "$OUT/log.txt" >&2)
echo "gpu_check exit $?"
