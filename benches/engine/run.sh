#!/usr/bin/env bash
# Engine benchmark (not a test; nothing in CI runs it): sluice-engine against llama.cpp on
# SmolLM2-135M-Instruct Q4_1, both on THREADS threads, and the two target ratios.
#
#   benches/engine/run.sh                    # everything (first run: ~30+ min to build llama.cpp)
#   THREADS=4 benches/engine/run.sh
#   SKIP_ENGINE=1 benches/engine/run.sh      # llama.cpp half only
#   SKIP_PEER=1 SKIP_BUILD=1 benches/engine/run.sh
#
# What it does:
#   1. scripts/fetch-models.sh (models/ at the repo root, or MODELS_DIR);
#   2. llama.cpp's Python binding in a venv OUTSIDE the repo (PEER_VENV, /tmp/sluice-peer):
#      `pip install llama-cpp-python` compiles llama.cpp from source (needs cmake; pass CMAKE_ARGS
#      through the environment if the default build fails). It runs at nice 19 in the
#      background while sluice-engine's release build runs, and its duration is reported;
#   3. llama.cpp: prefill tokens/s of a ~256-token prompt, single-stream greedy decode tokens/s
#      over 128 tokens;
#   4. sluice-engine: `sluice-engine serve MODEL --port PORT --threads THREADS --max-num-seqs 32`,
#      then over its OpenAI API: prefill tokens/s from time to first token (256-token prompt,
#      max_tokens 1), single-stream decode tokens/s from inter-token times (streamed), total
#      output tokens/s at 1, 8 and 32 concurrent streams (128 tokens each, greedy, ignore_eos),
#      and the server's peak RSS (VmHWM);
#   5. the table, also written to $CARGO_TARGET_DIR/engine-bench.md (prompts, raw JSON, install
#      and server logs in $CARGO_TARGET_DIR/engine-bench/), and the ratios:
#      our single-stream decode / llama.cpp's (target >= 0.7), our 32-stream total / llama.cpp's
#      single stream (target >= 3).
# Both engines get identical token-id prompts (bench.py prompts), each repetition and stream a
# different one, so a prefix cache cannot turn a measured prefill into a lookup.
#
# Environment: THREADS (2), PORT (8199), MODELS_DIR, PEER_VENV, CONCURRENCY ("1 8 32"),
# DECODE_TOKENS (128), PROMPT_TOKENS (256), REPS (3), SKIP_BUILD=1, SKIP_PEER=1, SKIP_ENGINE=1,
# CARGO_TARGET_DIR (default target/), ENGINE_LOG (RUST_LOG for the server).
# Run it on an otherwise idle machine: llama.cpp's OpenMP threads spin-wait, and with other
# processes on the same cores its 2-thread decode fell from ~50 to 3-22 tokens/s here.
# OMP_WAIT_POLICY=passive (passed through) makes it degrade gracefully instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo_root=$(pwd)

THREADS=${THREADS:-2}
PORT=${PORT:-8199}
PEER_VENV=${PEER_VENV:-/tmp/sluice-peer}
CONCURRENCY=${CONCURRENCY:-1 8 32}
DECODE_TOKENS=${DECODE_TOKENS:-128}
PROMPT_TOKENS=${PROMPT_TOKENS:-256}
REPS=${REPS:-3}
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
engine_bin="$target_dir/release/sluice-engine"
work="$target_dir/engine-bench"
mkdir -p "$work"

log() { echo "engine-bench: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "$repo_root/" in "$PEER_VENV"/*) die "PEER_VENV must be outside the repository" ;; esac

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Spinning worker threads (llama.cpp's OpenMP pool, ours) lose badly to other busy processes.
load1=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if float('$load1') > 0.5 else 1)"; then
  log "WARNING: 1-min load average is $load1: other work on this machine will skew the figures"
fi

gguf=$(scripts/fetch-models.sh "${MODELS_DIR:-$repo_root/models}" | head -n 1)
log "model: $gguf"

# --- llama.cpp's Python binding, built from source in the background -----------------------
peer_python="$PEER_VENV/bin/python"
install_pid=""
if [ "${SKIP_PEER:-0}" != 1 ] && ! "$peer_python" -c 'import llama_cpp, numpy' 2>/dev/null; then
  command -v cmake >/dev/null 2>&1 || die "cmake is missing (apt-get install -y cmake): llama-cpp-python compiles llama.cpp"
  log "installing llama-cpp-python into $PEER_VENV (compiles llama.cpp; log: $work/peer-install.log)"
  (
    start=$(date +%s)
    python3 -m venv "$PEER_VENV"
    nice -n 19 "$PEER_VENV/bin/pip" install --disable-pip-version-check llama-cpp-python numpy \
      >"$work/peer-install.log" 2>&1
    echo $(($(date +%s) - start)) >"$PEER_VENV/.install-seconds"
  ) &
  install_pid=$!
fi

# --- sluice-engine release build, meanwhile ------------------------------------------------
if [ "${SKIP_ENGINE:-0}" != 1 ] && [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building sluice-engine (release)"
  cargo build --release -p sluice-engine --bin sluice-engine >&2
fi

if [ -n "$install_pid" ]; then
  log "waiting for the llama-cpp-python build"
  wait "$install_pid" || die "llama-cpp-python install failed, see $work/peer-install.log"
fi
install_seconds=$(cat "$PEER_VENV/.install-seconds" 2>/dev/null || true)

# The prompts come from llama.cpp's tokenizer; without the peer there is nothing to tokenise with.
"$peer_python" benches/engine/bench.py prompts --gguf "$gguf" --long-tokens "$PROMPT_TOKENS" \
  >"$work/prompts.json"

llama_json=""
if [ "${SKIP_PEER:-0}" != 1 ]; then
  log "llama.cpp, $THREADS threads"
  llama_json="$work/llama.json"
  "$peer_python" benches/engine/bench.py llama --gguf "$gguf" --prompts "$work/prompts.json" \
    --threads "$THREADS" --decode-tokens "$DECODE_TOKENS" --reps "$REPS" >"$llama_json"
fi

sluice_json=""
if [ "${SKIP_ENGINE:-0}" != 1 ]; then
  [ -x "$engine_bin" ] || die "$engine_bin is missing (drop SKIP_BUILD)"
  log "sluice-engine, $THREADS threads, port $PORT (log: $work/engine.log)"
  RUST_LOG=${ENGINE_LOG:-warn} "$engine_bin" serve "$gguf" --port "$PORT" --threads "$THREADS" \
    --max-num-seqs 32 >"$work/engine.log" 2>&1 &
  engine_pid=$!
  pids+=("$engine_pid")
  healthy=0
  for _ in $(seq 600); do
    kill -0 "$engine_pid" 2>/dev/null || die "sluice-engine exited at startup, see $work/engine.log"
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
      healthy=1
      break
    fi
    sleep 0.5
  done
  [ "$healthy" = 1 ] || die "sluice-engine did not answer /health within 300 s, see $work/engine.log"
  sluice_json="$work/sluice.json"
  python3 benches/engine/bench.py sluice --url "http://127.0.0.1:$PORT" --prompts "$work/prompts.json" \
    --pid "$engine_pid" --decode-tokens "$DECODE_TOKENS" --reps "$REPS" \
    --concurrency "$CONCURRENCY" >"$sluice_json"
fi

report_args=(--threads "$THREADS")
[ -n "$llama_json" ] && report_args+=(--llama "$llama_json")
[ -n "$sluice_json" ] && report_args+=(--sluice "$sluice_json")
[ -n "$install_seconds" ] && report_args+=(--install-seconds "$install_seconds")
python3 benches/engine/bench.py report "${report_args[@]}" | tee "$target_dir/engine-bench.md"
