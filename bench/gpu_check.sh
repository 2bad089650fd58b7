#!/bin/bash
# The full-size checks for a machine with one large GPU (H100/H200), under 10 minutes, each step bounded:
#   bash bench/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/fullsize.json (s/frame text and picture, peak GPU memory per runtime option, KV reuse against
# recompute), OUT_DIR/decode.json (per-token decoding against context length) and OUT_DIR/pipeline.json (text
# ahead of the painter on one GPU, two CUDA streams), with their printouts.
set -u
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" || exit 1
timeout 360 python bench/bench_fullsize.py --frames 3 --context-frames 10 --json "$OUT/fullsize.json" 2>&1 | tee "$OUT/fullsize.txt"
timeout 120 python bench/bench_decode.py --preset seed-story-random --device cuda --dtype bf16 --repeats 3 \
  --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt"
timeout 100 python bench/bench_pipeline.py --preset seed-story-random --frames 4 --repeats 1 \
  --set generation.num_inference_steps=20 --json "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.txt"
