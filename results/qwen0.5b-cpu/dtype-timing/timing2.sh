#!/usr/bin/env bash
# Step time side by side: the same 4 pairs, 2 steps of 2 pairs, float32 then bfloat16 autocast.
cd /work/bench/q17/timing
export OMP_NUM_THREADS=2
for dtype in float32 bfloat16; do
  rm -rf "s_$dtype"
  python code_yfpo.py train --model /work/qwen05b --pairs p4.jsonl --lam 0 --lr 1e-5 \
    --batch-size 2 --grad-accum 1 --max-steps 2 --device cpu --dtype "$dtype" --seed 0 \
    --out "s_$dtype" > "slog_$dtype.txt" 2>&1
done
echo TIMING2DONE
