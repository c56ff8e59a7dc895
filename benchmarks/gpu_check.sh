#!/usr/bin/env bash
# The GPU checks of issue 14 as one short script (about 5 minutes on an H100), from the repository root:
#     bash benchmarks/gpu_check.sh
# 1. correctness: each custom op's Triton kernel against its torch reference on CUDA, CPU-vs-CUDA quantizers, short
#    training runs (benchmarks/cuda_check.py);
# 2. the speed targets, eager (no user compile): PACT fwd+bwd <= 1.3x ReLU's wall time on 64x64x32x32 and <= 1.1x its
#    kernel time on 512x64x32x32, DSQ <= 1.6x; a W4A4 PACT step <= 1.2x the float step, DSQ <= 1.3x.
set -euo pipefail
export PYTHONPATH=.
mkdir -p benchmarks/results
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
python benchmarks/cuda_check.py
python benchmarks/speed.py --device cuda --reps 30 --sections act step --json benchmarks/results/speed_cuda.json
python benchmarks/speed.py --device cuda --reps 30 --sections act --act-batch 512 --quick \
    --json benchmarks/results/speed_cuda_act512.json
