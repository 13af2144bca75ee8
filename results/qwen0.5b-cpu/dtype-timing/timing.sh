#!/usr/bin/env bash
# Issue 17: train step time on Qwen2.5-Coder-0.5B, float32 vs bfloat16 autocast, 20 DPO steps each on
# the same 40 pairs (SmolLM2's sampled r15 pairs; the curve comparison needs the same pairs, not Qwen's).
cd /work/bench/q17/timing
export OMP_NUM_THREADS=2
for dtype in float32 bfloat16; do
  rm -rf "t_$dtype"
  /usr/bin/time -v python code_yfpo.py train --model /work/qwen05b --pairs p40.jsonl --lam 0 --lr 1e-5 \
    --batch-size 2 --grad-accum 1 --max-steps 20 --device cpu --dtype "$dtype" --seed 0 \
    --out "t_$dtype" > "log_$dtype.txt" 2>&1
done
echo TIMINGDONE
