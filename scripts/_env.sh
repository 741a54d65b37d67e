# Shared by demo.sh and test.sh: create .venv if missing and install the project into it.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "memwatch needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $py ..." >&2
  "$py" -m venv .venv
fi
stamp=.venv/.memwatch-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing memwatch and its dependencies into .venv (first run downloads torch; a few minutes) ..." >&2
  # pip's own chatter goes to a log; it is shown only when the install fails.
  if ! .venv/bin/python -m pip install -e ".[test]" > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log >&2
    echo "Installing into .venv failed; the whole log is in .venv/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
