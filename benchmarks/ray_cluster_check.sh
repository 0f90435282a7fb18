#!/usr/bin/env bash
# A real two-node Ray cluster on this machine: a head node and a worker node (one CPU each,
# started with --node-ip-address=127.0.0.1 and the dashboard on 127.0.0.1; Ray 2.60 still
# registers them under the machine's address, and their GCS and raylets listen on all
# interfaces), a short default experiment submitted with `ray job submit` exactly as the
# README's "On a Ray cluster" section says, with two learner ranks placed one per node
# (STRICT_SPREAD) and two teacher replicas; a check that the run directory got summary.json
# and that the ranks ran on different nodes; and the two nodes stopped again whatever happened.
#
#   bash benchmarks/ray_cluster_check.sh                       # from the repository root
#   VENV=/path/to/.venv OPD_ZOO_DIR=/tmp/zoo bash benchmarks/ray_cluster_check.sh task.max_digits=1 ...
#
# Extra arguments are passed to opd-train. The nodes are stopped by ending the `ray start
# --block` processes this script started (which stop their own raylet, GCS, dashboard),
# not with `ray stop`, which would also stop every other Ray instance on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# absolute: the job's driver runs in another working directory, where a relative PATH entry
# (VENV=.venv) would not find opd-train
VENV=$(realpath -m "${VENV:-$ROOT/.venv}")
[ -x "$VENV/bin/opd-train" ] || { echo "FAIL: no opd-train in $VENV/bin (make setup, or set VENV)"; exit 1; }
export PATH="$VENV/bin:$PATH"  # the nodes (and so the job's driver) find opd-train here
# A new head node turns Ray's token authentication on by itself, but `ray start --address`
# (the worker node) only presents the token when asked to: ask every command here.
export RAY_AUTH_MODE=token
ZOO=${OPD_ZOO_DIR:-$HOME/.cache/opd}
WORK=$(mktemp -d /tmp/opd-raycheck.XXXXXX)
# Ray's own files (sessions, sockets, and ray_current_cluster, which a plain ray.init() on
# this machine would otherwise find and join) stay in this directory, not in /tmp/ray.
export RAY_TMPDIR=$WORK
RUN_DIR=$WORK/run

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
DASH=$(free_port)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped the nodes this script started (logs in $WORK)"
}
trap cleanup EXIT

# Each node's agents get their own free ports: the defaults (e.g. the dashboard agent's
# 52365) collide between two nodes on one machine, or with another local Ray, and a node
# whose agent cannot bind never accepts jobs ("No available agent to submit job").
agent_ports() {
  echo --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
    --ray-client-server-port="$(free_port)"
}
# shellcheck disable=SC2046  # agent_ports is a list of words
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --dashboard-host=127.0.0.1 \
  --dashboard-port="$DASH" --num-cpus=1 $(agent_ports) --block >"$WORK/head.log" 2>&1 &
PIDS+=($!)
wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "FAIL: timed out waiting for: $*"; exit 1; }
    sleep 2
  done
}
alive_nodes() {
  python -c "import ray; ray.init(address='127.0.0.1:$PORT', logging_level='ERROR')
assert sum(n['Alive'] for n in ray.nodes()) == $1"
}
wait_for 120 ray status --address "127.0.0.1:$PORT"
# shellcheck disable=SC2046
ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 $(agent_ports) \
  --block >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
wait_for 120 alive_nodes 2
echo "cluster up: head 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASH, 2 nodes x 1 CPU"

# What the README says, with an absolute run_dir (the job runs in a temporary copy of the
# working dir) and the zoo's location passed to the job's environment. Submission is retried
# while the fresh head's job agent registers ("No available agent to submit job").
JOB=opd-check-$$
ADDR="http://127.0.0.1:$DASH"
submit() {
  ray job submit --address "$ADDR" --submission-id "$JOB" --no-wait --working-dir . \
    --runtime-env-json "{\"excludes\": [\".venv\", \"runs\"], \"env_vars\": {\"OPD_ZOO_DIR\": \"$ZOO\"}}" \
    -- opd-train steps=3 eval_every=0 run_dir="$RUN_DIR" \
    resources.learner_workers=2 resources.learner_placement=STRICT_SPREAD resources.learner_num_cpus=0.25 \
    resources.teacher_workers=2 resources.teacher_num_cpus=0.25 "$@"
}
wait_for 180 submit "$@"
ray job logs --address "$ADDR" --follow "$JOB" | tee "$WORK/job.log"
ray job status --address "$ADDR" "$JOB" >"$WORK/job.status" 2>&1
grep -qi succeeded "$WORK/job.status" || { echo "FAIL: job $JOB did not succeed"; exit 1; }
echo "console lines of the job: $(wc -l < "$WORK/job.log")"

for f in summary.json metrics.jsonl report.md logs/learner-0.log logs/learner-1.log logs/teacher-1.log; do
  [ -s "$RUN_DIR/$f" ] || { echo "FAIL: $RUN_DIR/$f is missing"; exit 1; }
done
python - "$RUN_DIR" <<'EOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
ranks = s["learner_ranks"]
nodes = {r["node_id"] for r in ranks}
for r in ranks:
    print(f"learner rank {r['rank']}: node {r['node_id'][:12]}, pid {r['pid']}, {r['param_bytes']} parameter bytes")
if len(ranks) != 2 or len(nodes) != 2:
    sys.exit(f"FAIL: the two learner ranks should run on two nodes, got {len(ranks)} ranks on {len(nodes)}")
print(f"PASS: summary.json of {s['steps']} steps, two learner ranks on two nodes, student "
      f"{s['student_before']:.3f} -> {s['student_after']:.3f}, teacher {s['teacher']:.3f}, {s['total_seconds']:.0f}s")
EOF
