"""Time generate()'s decode steps on Qwen2.5-0.5B (float32, CPU): every model forward is timed;
a decode step is a forward of one new token per row. Usage: python decode_step.py YFPO_DIR MODEL TEST N"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, yfpo
model, tok = yfpo.load_model(sys.argv[2], torch.device("cpu"), torch.float32)
rows = yfpo.read_jsonl(sys.argv[3])[:int(sys.argv[4])]
prompts = [yfpo.format_prompt(tok, r["question"]) for r in rows]
calls, forward = [], model.forward
def timed(*a, **k):
    t = time.perf_counter(); out = forward(*a, **k)
    calls.append((k["input_ids"].shape[0], k["input_ids"].shape[1], time.perf_counter() - t))
    return out
model.forward = timed
start = time.perf_counter()
out = yfpo.generate(model, tok, prompts, batch_size=64, max_new_tokens=512)
wall = time.perf_counter() - start
decode = [(b, s) for b, n, s in calls if n == 1 and b > 1]
full = [s for b, s in decode if b == 64]
print(json.dumps({"prompts": len(prompts), "wall_s": round(wall, 1), "forwards": len(calls),
      "decode_steps": len(decode), "prefills": sum(n > 1 for _, n, _ in calls),
      "prefill_s": round(sum(s for b, n, s in calls if n > 1), 1),
      "decode_s": round(sum(s for _, s in decode), 1),
      "full_batch_steps": len(full), "median_full_batch_step_s": statistics.median(full) if full else None,
      "median_decode_step_s": statistics.median(s for _, s in decode),
      "generated_tokens": sum(c["tokens"] for c in out), "torch_threads": torch.get_num_threads()}))
