"""The README's Qwen figures that report.md does not print, from the published files: length and
style of the pairs and of each eval (and its accuracy by how answers stopped), each training's
second half (steps 25-48: pairs not yet trained on), the paired test of YFPO against
YFPO-random, and how far YFPO trained again moved from the first training, in its log and its
eval (with the repository's yfpo.py):
python results/qwen0.5b-cpu/figures.py (run from the repository's top)."""
import collections
import json
import statistics
import sys
from pathlib import Path

here = Path(__file__).parent
sys.path.insert(0, str(here.parents[1]))
import yfpo  # noqa: E402


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


pairs = rows(here / "pairs" / "pairs.jsonl")
for gold in (True, False):
    group = [p for p in pairs if p["chosen_is_gold"] == gold]
    chars = [statistics.mean(len(p[k][-1]["content"]) for p in group)
             for k in ("chosen", "rejected")]
    print(f"pairs with {'gold' if gold else 'own'} chosen: {len(group)}; mean characters chosen "
          f"{chars[0]:.0f}, rejected {chars[1]:.0f}")
for folder in sorted(here.glob("eval_*")):
    evals = rows(folder / "eval.jsonl")
    stops = collections.Counter(e["stop"] for e in evals)
    tokens = [e["tokens"] for e in evals]
    print(f"{folder.name[5:]}: {sum(e['correct'] for e in evals)}/{len(evals)} right; tokens "
          f"{sum(tokens)}, median {statistics.median(tokens)}; mean characters "
          f"{statistics.mean(len(e['completion']) for e in evals):.0f}; median lines "
          f"{statistics.median(e['completion'].strip().count(chr(10)) + 1 for e in evals)}; stops "
          f"answer {stops['answer']} / eos {stops['eos']} / length {stops['length']}; right among "
          "them " + " / ".join(f"{sum(e['correct'] for e in evals if e['stop'] == k)}/{stops[k]}"
                               for k in ("answer", "eos", "length")))
for folder in sorted(here.glob("train_*")):
    steps = [m for m in rows(folder / "metrics.jsonl") if m["step"] >= 25]
    print(f"{folder.name[6:]}, steps 25-48, mean: " + ", ".join(
        f"{k} {statistics.mean(m[k] for m in steps):.4f}"
        for k in ("loss/dpo", "rewards/margins", "neuron/margin_gain")))
arms = [rows(here / f"eval_{name}" / "eval.jsonl") for name in ("yfpo", "yfpo_random")]
d = yfpo.paired_difference([(a["correct"], b["correct"]) for a, b in zip(*arms)])
a, b = d["only_this_correct"], d["only_other_correct"]
reach = yfpo.mcnemar_detectable(a + b, d["shared"])
print(f"yfpo vs yfpo_random: {d['difference']:+.4f} (McNemar p {d['mcnemar_p']:.3g}; {a} vs {b}; "
      f"detectable {'none' if reach is None else f'{reach:.3f}'})")
# YFPO trained again, with the same command and seed (its first model was lost with a machine)
first, again = (rows(here / n / "metrics.jsonl") for n in ("train_yfpo", "train_yfpo_retrain"))
print(f"train_yfpo retrained: c {first[0]['c']:.6f} then {again[0]['c']:.6f}; largest "
      "difference over the steps: " + ", ".join(
          f"{k} {max(abs(m[k] - n[k]) for m, n in zip(first, again)):.2g}"
          for k in ("loss", "rewards/margins", "neuron/margin_gain")))
first, again = (rows(here / n / "eval.jsonl") for n in ("eval_yfpo", "eval_yfpo_retrain"))
same = sum(e["completion"] == f["completion"] for e, f in zip(first, again))
print(f"its eval: {same} of {len(first)} completions identical to eval_yfpo's")
