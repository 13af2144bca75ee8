"""The length and style columns of the README's Qwen tables, from the published files:
python results/qwen0.5b-cpu/lengths.py (run from the repository's top)."""
import collections
import json
import statistics
from pathlib import Path

here = Path(__file__).parent


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


pairs = rows(here / "pairs" / "pairs.jsonl")
for gold in (True, False):
    group = [p for p in pairs if p["chosen_is_gold"] == gold]
    chars = [statistics.mean(len(p[k][-1]["content"]) for p in group) for k in ("chosen", "rejected")]
    print(f"pairs with {'gold' if gold else 'own'} chosen: {len(group)}; mean characters chosen "
          f"{chars[0]:.0f}, rejected {chars[1]:.0f}")
for folder in sorted(here.glob("eval_*")):
    evals = rows(folder / "eval.jsonl")
    stops = collections.Counter(e["stop"] for e in evals)
    print(f"{folder.name[5:]}: {sum(e['correct'] for e in evals)}/{len(evals)} right; tokens "
          f"{sum(e['tokens'] for e in evals)}, median {statistics.median(e['tokens'] for e in evals)}; "
          f"mean characters {statistics.mean(len(e['completion']) for e in evals):.0f}; median lines "
          f"{statistics.median(e['completion'].strip().count(chr(10)) + 1 for e in evals)}; stops "
          f"answer {stops['answer']} / eos {stops['eos']} / length {stops['length']}")
