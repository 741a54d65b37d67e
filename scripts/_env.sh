# Shared by demo.sh and test.sh: create .venv if missing and install the project into it, with every
# extra, pinned to the exact tested set in constraints.txt (pyproject.toml has lower bounds only).
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  # constraints.txt was made on 3.11; any Python >= 3.10 can install memwatch itself.
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "memwatch needs Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $py ..." >&2
  "$py" -m venv .venv
fi
stamp=.venv/.memwatch-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing memwatch and its dependencies into .venv (first run downloads torch; a few minutes) ..." >&2
  # pip's own chatter goes to a log; it is shown only when the install fails.
  # torch goes first, on its own: pip keeps every wheel it downloads until its install ends, and torch's
  # CUDA libraries are 2.6 GiB of wheels for 5 GiB installed. In one step the install needs 9.5 GiB of disk
  # at its peak, in two 7.7 GiB (measured 2026-12-01, fresh venv, empty pip cache); CI ran out of disk in one.
  if ! { .venv/bin/python -m pip install -c constraints.txt torch \
      && .venv/bin/python -m pip install -c constraints.txt -e ".[all,test]"; } > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log >&2
    echo "Installing into .venv failed; the whole log is in .venv/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
