#!/usr/bin/env bash
# One-shot GPU check (issue 19): the 7b presets on one GPU in under 8 minutes, one JSON out.
#
#   benchmarks/gpu_check.sh [OUT.json]      (default: gpu_check.json; PYTHON overrides the venv)
#
# 1. memory plan of the 7B m2sa recipe (train_ds.py --estimate_memory --json, no weights);
# 2. a training step of the 7b preset (random LLaVA-7B + SAM ViT-H weights, bf16, ZeRO-2,
#    gradient checkpointing, flash-attention 2 when flash_attn is installed, else sdpa):
#    padded with trimmed logits, then full logits, then packed (--packing, train_ds.py's default
#    for both: one varlen row per micro-batch, with sdpa one sdpa call per conversation), each
#    for the same number of steps (samples/s, tokens/s,
#    model TFLOP/s, MFU against the card's bf16 peak, peak memory, "speedup" of trimmed over
#    full logits, "packing_speedup" of packed over padded);
# 3. generation of the 7b preset with and without the KV cache.
# Each part has its own time limit; a part that fails or runs out of time is recorded as an
# error and the rest still runs.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-gpu_check.json}"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT

ATTENTION="$("$PYTHON" -c 'import importlib.util as u; print("flash_attention_2" if u.find_spec("flash_attn") else "sdpa")')"

# run NAME SECONDS COMMAND...: the command's stdout (one JSON object) into $PARTS/NAME.json
run() {
    local name="$1" limit="$2"
    shift 2
    echo "gpu_check: $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" >"$PARTS/$name.json" 2>"$PARTS/$name.log"
    local status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 20 "$PARTS/$name.log" >&2
        printf '{"error": "exit status %s (124: over %ss)"}' "$status" "$limit" >"$PARTS/$name.json"
    fi
}

run memory_plan 40 "$PYTHON" train_ds.py --version=LLaVA-7B-Lightening-v1-1 \
    --estimate_memory --json --gpu_memory_gb=80
run train_step 340 "$PYTHON" benchmarks/train_step.py --preset 7b --steps 4 \
    --grad_accumulation_steps 2 --workers 4 --attn_implementation "$ATTENTION" \
    --compare_full_logits --compare_packing
run generate 90 "$PYTHON" benchmarks/generate.py --preset 7b --new_tokens 32,128 \
    --batch_sizes 1,8

"$PYTHON" - "$PARTS" "$OUT" "$ATTENTION" <<'PY'
import json
import sys
from pathlib import Path

parts, out, attention = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
report = {"attn_implementation": attention}
for name in ("memory_plan", "train_step", "generate"):
    text = (parts / f"{name}.json").read_text()
    try:
        report[name] = json.loads(text)
    except json.JSONDecodeError:
        report[name] = {"error": "no JSON", "stdout_tail": text[-2000:]}
out.write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
PY
