#!/usr/bin/env bash
# Source me: creates/updates ./.venv with the pinned requirements and the project (editable),
# re-installing only when requirements.txt or setup.py changed. Leaves the venv activated.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CURATE_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
stamp_value="$(cat "$REPO/requirements.txt" "$REPO/setup.py" | sha256sum | cut -c1-16)"
stamp_file="$VENV/.curate-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp_file" 2>/dev/null || true)" != "$stamp_value" ]; then
  echo "[setup] installing pinned requirements (first run takes a few minutes: torch is large)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$stamp_value" > "$stamp_file"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export NO_ALBUMENTATIONS_UPDATE=1  # img2dataset's albumentations would phone home on import
