#!/usr/bin/env bash
# Run the tests on any machine, a fresh one included: set up what they need, then python -m pytest.
#
#   scripts/test.sh                      # the whole suite (what CI runs)
#   scripts/test.sh tests/test_data.py   # arguments go to pytest
#   scripts/test.sh -m "not slow"        # leave out the slowest tests while working on the code
#
# pytest runs on one pytest-xdist worker per core (-n auto; PYTEST_WORKERS=2 or =0 to choose, 0:
# no workers), each test module on one worker (--dist loadscope: its module fixtures built once),
# the modules in the order tests/conftest.py gives them (the slowest first).
#
# What it sets up, each step skipped when already done (so a second call starts pytest at once):
#   * Debian packages the tests use: chromium (the report is rendered headless) and
#     dataset-fashion-mnist (the Fashion-MNIST source), installed with apt-get when missing and
#     running as root; otherwise it says how to install them;
#   * .venv, with torch 2.14.1 and torchvision 0.29.1 (the pinned versions; pip finds them in
#     the configured indexes or local wheel folders), and this package with its test extras
#     (pip install -e '.[test]'), reinstalled when pyproject.toml changed since.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "scripts/test.sh: missing ${need[*]} (install with: sudo apt-get install ${need[*]}); tests that need them will fail" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python

if ! "$py" - <<'PY' 2>/dev/null
import sys
import torch, torchvision
base = lambda v: v.split("+")[0]
sys.exit(not (base(torch.__version__) == "2.14.1" and base(torchvision.__version__) == "0.29.1"))
PY
then
  echo "scripts/test.sh: installing torch 2.14.1 and torchvision 0.29.1 into .venv" >&2
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi

# the package must be installed from this checkout (not another clone's), with pytest
stamp=.venv/.noisystudent-test-install
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$py" - <<'PY' 2>/dev/null
import pathlib, sys
import pytest, noisystudent
sys.exit(pathlib.Path(noisystudent.__file__).resolve().parents[1] != pathlib.Path("src").resolve())
PY
then
  echo "scripts/test.sh: installing noisystudent (editable) with its test extras into .venv" >&2
  "$py" -m pip install -q -e ".[test]"
  touch "$stamp"
fi

exec "$py" -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadscope --no-loadscope-reorder "$@"
