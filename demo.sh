#!/usr/bin/env bash
# One command from a fresh clone: `bash demo.sh [demo.py options]` (e.g. `bash demo.sh --quick`).
# The first run creates .venv with the pinned requirements (README, "Set up", does the same by
# hand); later runs reuse it, and reinstall only when requirements*.txt changed. Then it runs the
# CPU demo.
set -euo pipefail
cd "$(dirname "$0")"

stamp=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
# missing, half-installed or outdated: (re)install
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    echo "setting up .venv (first run: a few minutes, ~1.5 GB) ..."
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
    echo "$stamp" > .venv/.installed  # written last: an interrupted install is redone
fi
exec .venv/bin/python demo.py "$@"
