#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ./run_tests.sh [pytest args]
# Two workers, a test file per worker at a time (session fixtures such as the demo run are built
# once per worker, not once per test); CURATE_TEST_WORKERS=0 runs in this process only.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
workers="${CURATE_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec python -m pytest tests -q -p no:cacheprovider "$@"
fi
exec python -m pytest tests -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
