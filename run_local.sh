#!/usr/bin/env bash
# The demo: serve a generated corpus from 127.0.0.1 and run the whole pipeline on it.
#   ./run_local.sh [--output DIR]      (default DIR: ./demo_output)
set -euo pipefail
cd "$(dirname "$0")"
OUTPUT="demo_output"
while [ $# -gt 0 ]; do
  case "$1" in
    --output) OUTPUT="$2"; shift 2 ;;
    --output=*) OUTPUT="${1#--output=}"; shift ;;
    *) echo "usage: ./run_local.sh [--output DIR]" >&2; exit 2 ;;
  esac
done
source scripts/ensure_venv.sh
CORPUS="$(mktemp -d)"
python -m pipeline.demo serve --root "$CORPUS" --port-file "$CORPUS/port" >"$CORPUS/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; rm -rf "$CORPUS"' EXIT
for _ in $(seq 1 100); do [ -s "$CORPUS/port" ] && break; sleep 0.1; done
PORT="$(cat "$CORPUS/port")"
python -m pipeline.demo corpus --root "$CORPUS" --base-url "http://127.0.0.1:$PORT" >/dev/null
echo "[demo] serving $(($(wc -l <"$CORPUS/rows.csv") - 1)) rows from http://127.0.0.1:$PORT"
# CLIP: the demo uses the tiny model the project trains itself (pipeline/assets/tiny_clip.pt), since
# nothing can be downloaded here; real runs use ViT-B-32 laion2b_s34b_b79k or a local checkpoint.
curate run --input "$CORPUS/rows.csv" --output "$OUTPUT" --allow-host "127.0.0.1:$PORT" \
  --set request_deadline_s=5 --set samples_per_shard=100 \
  --set clip_model=tiny_clip --set clip_checkpoint=pipeline/assets/tiny_clip.pt
