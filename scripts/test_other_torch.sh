#!/usr/bin/env bash
# Install memwatch the way a user does, into a fresh environment that already has ANOTHER torch (as a
# training environment with its own CUDA build has), check that pip kept that torch, and run the suite
# against it. No extras and no constraints: the optional parts' tests skip, naming the missing package.
#
#   TORCH=<wheel file or pip requirement> bash scripts/test_other_torch.sh [pytest args]
#
# Default TORCH: the CPU torch 2.13 wheel in /opt/wheels when present (the index has only 2.15);
# without one the check is skipped with that reason (exit 0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_spec="${TORCH:-$(ls /opt/wheels/torch-2.13.0*.whl 2>/dev/null | head -n 1 || true)}"
if [ -z "$torch_spec" ]; then
  echo "test_other_torch: no other torch to pre-install (set TORCH=a wheel or requirement); skipped" >&2
  exit 0
fi
py="${PYTHON:-python3.11}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$torch_spec" > "$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; exit 1; }
before="$("$work/venv/bin/python" -c 'import torch; print(torch.__version__)')"
"${pip[@]}" "$root[test]" >> "$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; exit 1; }
after="$("$work/venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "$before" != "$after" ]; then
  echo "test_other_torch: installing memwatch replaced torch $before with $after" >&2
  exit 1
fi
echo "test_other_torch: torch $after kept; running the suite against it" >&2
# The tests import the installed package (the checkout's src/ is not on the path); the doctests of
# src/ are left out here, since they would import the checkout's copy instead.
cd "$root"
# Left out here: with torch 2.13 (CPU, gloo) a two-process run hangs at interpreter exit, after training and
# memwatch have finished and written everything, in about 1 run of 6 (measured 2026-12-01: the stuck rank
# sits in train_ddpm.py's last line with a native thread alive). The two-process path is tested by the main
# suite on the tested torch; here it would only make CI flaky.
# Not exec: the EXIT trap must still remove the ~1.7 GB environment when pytest ends.
rc=0
"$work/venv/bin/python" -m pytest -p no:cacheprovider -o testpaths=tests \
  --deselect tests/test_train_script.py::test_train_ddpm_under_accelerate_launch_with_two_processes "$@" || rc=$?
exit "$rc"
