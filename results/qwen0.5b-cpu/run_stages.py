# Runs the named stages of run.sh's `reproduce`, in the order given, with reproduce's own loop
# body (the run's code, code/yfpo.py = 56afc2d): the same command lines, the same keys in
# stage.json, so a later `reproduce` skips them. Used to run YFPO-random's stages before YFPO's
# held-out scores (whose model was gone with an earlier machine), then `train_yfpo score_yfpo`.
# usage: run_stages.py STAGE...
import hashlib, json, os, shlex, sys, time, shutil
from pathlib import Path
sys.path.insert(0, "code")
import yfpo
run_argv = shlex.split(open("run.sh").read().split("python code/yfpo.py ", 1)[1]
                   .replace('"${LR:-1e-6}"', "1e-6").replace('"${ACCUM:-2}"', "2"))
args = yfpo.build_parser().parse_args(run_argv)
out = Path(args.out)
stages, keys = yfpo.reproduce_stages(args, out), {}
for stage, argv, reads in stages:  # every key, in reproduce's order (a key reads earlier ones)
    line = ["OUT" + a[len(str(out)):] if a.startswith(str(out) + os.sep) else a for a in argv]
    stamp_of = json.dumps([line, [keys[r] for r in reads]]).encode()
    keys[stage] = hashlib.sha256(stamp_of).hexdigest()[:16]
argvs = {stage: argv for stage, argv, _ in stages}
for stage in sys.argv[1:]:
    key, argv = keys[stage], argvs[stage]
    stamp_path, stamp = out / stage / "stage.json", {"key": key, "argv": argv}
    old = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    if old.get("key") == key and "seconds" in old:
        print(f"[run_stages] {stage}: done with these settings, skipped")
        continue
    resume = old.get("key") == key and (out / stage / "model" / "trainer_state.pt").is_file()
    if not resume:
        shutil.rmtree(out / stage, ignore_errors=True)
    yfpo.write(stamp_path, stamp)
    print(f"\n[run_stages] {stage}{' (resuming its checkpoint)' * resume} -> {out / stage}",
          flush=True)
    start = time.perf_counter()
    yfpo.main([*argv, "--out", str(out / stage), *["--resume"] * resume], strict=True)
    stamp["seconds"] = round(time.perf_counter() - start, 1)
    yfpo.write(stamp_path, stamp)
