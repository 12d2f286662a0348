#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m pytest tests -q -p no:cacheprovider "$@"
