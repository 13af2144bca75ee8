export OMP_NUM_THREADS=2
python code/yfpo.py reproduce --model /work/qwen05b --data /work/shared/data/gsm8k --control /work/shared/data/control/piqa.jsonl --device cpu --dtype float32 --num-samples 128 --ablate-samples 64 --random-seeds 4 --num-questions 200 --samples-per-question 4 --eval-limit 300 --lr "${LR:-1e-6}" --train-batch-size 2 --grad-accum "${ACCUM:-2}" --save-every 10 --out q17
