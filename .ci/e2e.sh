#!/usr/bin/env bash
# A short end-to-end run of the real CLI on a tiny model: init -> generate -> SFT -> RL -> eval,
# then the Python API example.
set -euo pipefail
BIN=.venv/bin
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT
export OMP_NUM_THREADS=1
$BIN/dirl init --config configs/tiny.yaml --out "$RUN/init"
$BIN/dirl generate --model "$RUN/init" --prompt "12+34=" --json max_new_tokens=8
$BIN/dirl sft --config configs/tiny-sft.yaml model="$RUN/init" out="$RUN/sft" max_steps=5 save_every=0 progress=false
$BIN/dirl rl --config configs/tiny-rl.yaml model="$RUN/sft/final" out="$RUN/rl" max_steps=2 --no-progress
$BIN/dirl eval --model "$RUN/rl/final" --data ../shared/data/gsm8k_test.jsonl --reward gsm8k limit=4 \
    sampling.max_new_tokens=16 out="$RUN/eval"
test -s "$RUN/eval/samples.jsonl"
# the Python API: 2 SFT + 2 DiPO steps with a TRL-signature reward (exits non-zero if its mean is 0)
$BIN/python examples/python_api.py "$RUN/python-api"
test -s "$RUN/python-api/rl/metrics.jsonl"
echo "e2e: ok"
