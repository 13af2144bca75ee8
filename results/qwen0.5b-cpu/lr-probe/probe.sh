#!/usr/bin/env bash
# Issue 17's lr probe: plain DPO (lam 0) on the first 40 pairs of q17/pairs, batch 2 x accum 2,
# 10 steps (one pass), float32, at each rate given; the code is the run's (code/yfpo.py).
cd /work/bench/q17
export OMP_NUM_THREADS=2
head -40 q17/pairs/pairs.jsonl > probe/p40.jsonl
for LR in "$@"; do
  python code/yfpo.py train --model /work/qwen05b --pairs probe/p40.jsonl --lam 0 --lr "$LR" \
    --batch-size 2 --grad-accum 2 --max-steps 10 --max-length 512 --device cpu --dtype float32 \
    --out "probe/lr$LR" > "probe/lr$LR.log" 2>&1
done
