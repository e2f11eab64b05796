#!/usr/bin/env bash
# A short end-to-end run of the real CLI on a tiny model (a few steps of each stage).
set -euo pipefail
BIN=.venv/bin
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT
$BIN/dirl init --config configs/tiny.yaml --out "$RUN/init"
$BIN/dirl generate --model "$RUN/init" --prompt "12+34=" --json max_new_tokens=8
echo "e2e: ok"
