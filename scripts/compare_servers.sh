#!/usr/bin/env bash
# Issue 3 evidence: the same multi-turn workloads against `tokenmill serve` and llama.cpp's llama-server on the same
# SmolLM2 GGUF, one server at a time, on this machine. Writes docs/bench/serve_<server>_<workload>.json + plots.
# Usage: scripts/compare_servers.sh LLAMA_SERVER_BIN [SESSIONS]   (SKIP_TOKENMILL=1: llama-server only)
set -euo pipefail
llama_server=${1:?path to llama-server (scripts/build_llama_cpp.sh builds it)}
sessions=${2:-16}
gguf=$(python -c "from tokenmill.models.hub import default_model_path; print(default_model_path())")
out=docs/bench
mkdir -p "$out"
port=8123
ctx=4096

wait_health() {
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0; sleep 1; done
  echo "server on $port did not come up" >&2; return 1
}

run_workloads() {  # $1 = server label
  for workload in "chat,rate=0.5,scale=0.5" "coding_agent,rate=0.2,scale=0.03"; do
    name=${workload%%,*}
    tokenmill bench serve --base-url "http://127.0.0.1:$port" --workload "$workload" --num-sessions "$sessions" \
      --seed 1 --max-context $ctx --max-gap 5 --time-scale 0.1 --request-timeout 300 --no-progress \
      --slo ttft_p90=2s,tpot_p90=100ms --output "$out/serve_$1_$name.json" --plot-dir "$out/plots_$1_$name"
  done
}

pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null || true' EXIT
if [ "${SKIP_TOKENMILL:-0}" != 1 ]; then
  tokenmill serve "$gguf" --port $port --max-model-len $ctx --log-level warning &
  pid=$!
  wait_health
  run_workloads tokenmill
  kill $pid; wait $pid 2>/dev/null || true
fi

"$llama_server" -m "$gguf" --host 127.0.0.1 --port $port -np 4 -c $((ctx * 4)) -t "$(nproc)" --no-webui \
  >/dev/null 2>&1 &
pid=$!
wait_health
run_workloads llamacpp
kill $pid; wait $pid 2>/dev/null || true
