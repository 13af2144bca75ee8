# report.md of every finished stage, written by the run's own code (code/yfpo.py = 56afc2d):
# the same write_report and plot that reproduce calls at its end, over the stages that have seconds.
cd /work/bench/q17
python - "$@" <<'PY'
import json, shlex, sys, argparse
from pathlib import Path
sys.path.insert(0, "code")
import yfpo
argv = shlex.split(open("run.sh").read().split("python code/yfpo.py ", 1)[1].replace('"${LR:-1e-6}"', "1e-6").replace('"${ACCUM:-2}"', "2"))
args = yfpo.build_parser().parse_args(argv)
out = Path(args.out)
seconds = {}
for stage, _, _ in yfpo.reproduce_stages(args, out):
    p = out / stage / "stage.json"
    s = json.loads(p.read_text()) if p.is_file() else {}
    if "seconds" not in s:
        continue
    seconds[stage] = s["seconds"]
yfpo.write_report(out, args, seconds)
if any(s.startswith("train_") for s in seconds):
    yfpo.cmd_plot(argparse.Namespace(dirs=[str(out)], out=out / "report.png"))
print("stages in the report:", ", ".join(seconds))
PY
