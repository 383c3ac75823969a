#!/usr/bin/env bash
# Smoke job on the newest torch, torchvision and timm the package index serves (CI runs it after
# the pinned suite): a second venv, this package installed from a freshly built wheel, then, from
# a scratch folder outside the checkout, what a new user does first:
#   the default run at tiny size -> export --onnx (checked against PyTorch) -> predict on a folder
#   with each kind of model (run dir, model.pt, exported folder) into the three formats.
# It prints the versions it ran and ends with one "smoke: N passed, M failed" line.
#
#   scripts/smoke_latest.sh                                          # the newest releases
#   scripts/smoke_latest.sh torch==2.5.1 torchvision==0.20.1 timm==1.0.21   # any other set (the lower bounds)
#
# SMOKE_VENV: the venv (default ~/.cache/noisystudent/smoke-venv, or smoke-venv-pinned with
# arguments). It is kept between runs: the first run downloads torch with its CUDA libraries
# (several GB, minutes); later ones only ask the index for newer releases.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -eq 0 ]; then
  venv=${SMOKE_VENV:-$HOME/.cache/noisystudent/smoke-venv}
  set -- --upgrade torch torchvision timm
else
  venv=${SMOKE_VENV:-$HOME/.cache/noisystudent/smoke-venv-pinned}
fi
# A machine-wide pip constraints file (PIP_CONSTRAINT, or one in pip's config) may pin torch to
# the versions the pinned suite tests; this job is about the others, so it applies none.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS

work=$(mktemp -d "${TMPDIR:-/tmp}/noisystudent-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip() {  # pip, its chatter kept in a log that is shown when it fails
  if ! "$py" -m pip "$@" >"$work/pip.log" 2>&1; then
    echo "smoke: pip $* failed:"; tail -n 30 "$work/pip.log"; echo "smoke: 0 passed, 1 failed"; exit 1
  fi
}
pip install "$@"
# the wheel a user would get (built with its own build requirements), then its dependencies
pip wheel --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/noisystudent-*.whl)
pip install --force-reinstall --no-deps "$wheel"
pip install "$wheel[onnx]"
echo "smoke: installed in $((SECONDS - start)) s"

cd "$work"  # outside the checkout: only the installed package is found
ns="$venv/bin/noisystudent"
"$ns" --version
"$py" - <<'PY'
from importlib.metadata import version
print("smoke: versions: " + ", ".join(f"{p} {version(p)}" for p in
      ("torch", "torchvision", "timm", "numpy", "pillow", "pyarrow", "onnx", "onnxruntime", "onnxscript")))
PY

passed=0 failed=0
step() {  # step NAME COMMAND...: run it, count it, show its output when it fails
  local name=$1 t=$SECONDS
  shift
  # a step that succeeds but prints a traceback or a native library's leak report at exit (triton's
  # nanobind under torch 2.15 did) fails too: a new user would take it for a crash
  if "$@" >"$work/step.log" 2>&1 && ! grep -q -E "^Traceback|nanobind: leaked" "$work/step.log"; then
    passed=$((passed + 1)); echo "smoke: ok   $name ($((SECONDS - t)) s)"
  else
    failed=$((failed + 1)); echo "smoke: FAIL $name ($((SECONDS - t)) s):"; tail -n 30 "$work/step.log"
  fi
}

# the tiny-run preset of the tests (tests/_tiny.py): 3 teacher epochs, 1 per student, 200 pool images
tiny=(--set train.batch_size=16 --set data.val_per_class=5 --set data.test_per_class=10
      --set teacher.epochs=3 --set train.epochs=1 --set data.max_unlabeled=200 --set pseudo.threshold=0.0)
step "config --list and by name" "$ns" config fashion-mnist
step "run (the default digits config, tiny)" "$ns" run --out run --quiet "${tiny[@]}"
step "export --onnx" "$ns" export run --out exported --onnx
"$py" - <<'PY'
import os
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

os.makedirs("images/sub", exist_ok=True)
for i, image in enumerate(load_digits().images[:40]):
    Image.fromarray((image * 15).astype(np.uint8)).save(f"images/{'sub/' if i % 4 == 0 else ''}{i:03d}.png")
with open("images/broken.jpg", "wb") as f:
    f.write(b"not an image")
PY
step "predict folder, run dir -> csv" "$ns" predict images --model run --out preds.csv --quiet
step "predict folder, export dir -> jsonl" "$ns" predict images --model exported --out preds.jsonl --quiet
final_model=$("$py" -c "import json; print(json.load(open('exported/config.json'))['noisystudent']['stage'])")
step "predict folder, model.pt -> parquet" "$ns" predict images --model "run/$final_model/model.pt" --out preds.parquet --quiet
step "the three outputs agree, the broken file listed" "$py" - <<'PY'
import csv, json
import pyarrow.parquet as pq
rows_csv = list(csv.DictReader(open("preds.csv")))
rows_jsonl = [json.loads(line) for line in open("preds.jsonl")]
rows_parquet = pq.read_table("preds.parquet").to_pylist()
assert len(rows_csv) == len(rows_jsonl) == len(rows_parquet) == 40, (len(rows_csv), len(rows_jsonl), len(rows_parquet))
for a, b, c in zip(rows_csv, rows_jsonl, rows_parquet):
    assert a["image"] == b["image"] == c["image"] and a["class_1"] == b["class_1"] == c["class_1"], (a, b, c)
    assert abs(float(a["prob_1"]) - c["prob_1"]) < 1e-4 and abs(b["prob_1"] - c["prob_1"]) < 1e-4, (a, b, c)
for name in ("preds.csv.unreadable.tsv", "preds.jsonl.unreadable.tsv", "preds.parquet.unreadable.tsv"):
    assert "images/broken.jpg" in open(name).read(), open(name).read()
print("agree:", len(rows_csv), "rows")
PY

echo "smoke: $((SECONDS - start)) s in all"
echo "smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
