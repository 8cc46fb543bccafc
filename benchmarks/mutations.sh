#!/usr/bin/env bash
# Break five features on purpose, each in a scratch worktree of HEAD, and show which test fails:
# evidence that the suite observes those features (bash benchmarks/mutations.sh).
set -u
SRC=$(cd "$(dirname "$0")/.." && pwd)
. $SRC/.venv/bin/activate
run() {  # name, file, python-replacement (old, new), tests
  name="$1"; file="$2"; old="$3"; new="$4"; shift 4
  d=$(mktemp -d); git -C $SRC worktree add -q --detach $d HEAD 2>/dev/null || cp -r $SRC $d
  python - "$d/$file" "$old" "$new" <<'PY'
import sys
p, old, new = sys.argv[1:]
s = open(p).read()
assert old in s, f"mutation target not found in {p}"
open(p, "w").write(s.replace(old, new, 1))
PY
  echo "== mutation: $name"
  (cd $d && PYTHONPATH=$d/src python -m pytest -q -p no:cacheprovider -x "$@" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -5)
  git -C $SRC worktree remove --force $d 2>/dev/null || rm -rf $d
}
run "skip fine-tuning" src/foldercnn/training/job.py "    if not fine_tune:
        return probe, 0" "    if True:
        return probe, 0" tests/test_effnet.py -k round_trip
run "drop bf16 autocast" src/foldercnn/runtime.py 'if precision == "bf16":' 'if False:' tests/test_training_behaviour.py -k precision
run "ignore --tta" src/foldercnn/cli.py "tta=True if args.tta else None" "tta=None" tests/test_training_behaviour.py -k tta
run "keep the last epoch, not the best" src/foldercnn/training/loop.py 'return best is None or stats["val_accuracy"] >= best["val_accuracy"]' 'return True' tests/test_training_behaviour.py -k best
run "fit the temperature on the test folder (the demo validates on test/)" src/foldercnn/demo.py "result = train_folder(root / \"train\", out, recipe=recipe_obj.name, seed=seed," "result = train_folder(root / \"train\", out, recipe=recipe_obj.name, val_dir=test_dir, seed=seed," tests/test_download.py -k demo
