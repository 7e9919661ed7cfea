#!/usr/bin/env bash
# Keyed-vs-unkeyed cost of tenancy, with both gateways loaded at the same time.
#
# `ab.sh` loads A (no keys) and B (a virtual key with a budget and an rpm limit on every
# request, and a spend row each) in turns. On a shared VM the neighbours' load moves a
# gateway's CPU per request by ±20% within seconds, so its round ratios spread from 0.7 to
# 1.05. Here A and B run side by side on the same CPU (GW_CPU), each driven by its own
# `sluice-load` on LOAD_CPU, so whatever the machine does in a round it does to both alike.
#
# The figure is the CPU each gateway spends per request (utime + stime of all its threads,
# over the round and the pause after it, so B's spend writes count to B), and A's over B's:
# on one saturated core, requests/s is the inverse of CPU per request, so that ratio is B's
# requests/s over A's. The requests/s the two reach side by side are printed too, but they are
# not the figure: the scheduler shares the core between threads, not processes, and B's
# spend writer is a thread of its own.
#
# After the rounds it prints the CPU per request of each gateway's threads over all rounds, so
# that B's extra splits into its request thread and its spend writer. Then B gets SIGTERM (which
# flushes its spend log) and the rows it wrote are counted against the requests it was sent.
#
# Environment: KEYS=sqlite|postgres|memory (B's store), ROUNDS=6, DURATION=4, WARMUP=1,
# PAUSE=1.5, CONCURRENCY=16, GW_CPU=0, LOAD_CPU=1, SKIP_BUILD=1, BENCH_PG (as in run.sh).
set -euo pipefail

KEYS=${KEYS:-sqlite}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
PAUSE=${PAUSE:-1.5}
CONCURRENCY=${CONCURRENCY:-16}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/harness.sh
source "$ROOT/benches/harness.sh"

build_unless_skipped

start_ab_pair

# load PORT OUT [HEADER]: sluice-load in the background, its JSON into OUT; its pid in LOAD_PID.
load() {
    local port=$1 out=$2
    shift 2
    local hdr=()
    [[ $# -gt 0 ]] && hdr=(-H "$1")
    taskset -c "$LOAD_CPU" "$BIN/sluice-load" --url "http://127.0.0.1:$port/v1/chat/completions" \
        --model bench --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
        --body "$WORK/body.json" "${hdr[@]}" >"$out" &
    LOAD_PID=$!
}

# cpu_ns_per_req TICKS REQUESTS
cpu_ns_per_req() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%d", t * 1e9 / hz / n }'; }

echo "| round | A CPU ns/req (no keys) | B CPU ns/req ($KEYS) | B/A throughput (A CPU / B CPU) | A rps | B rps | A p99 µs | B p99 µs |"
echo "|--:|--:|--:|--:|--:|--:|--:|--:|"
RATIOS=()
A_SENT=0
thread_ticks "$A_PID" >"$WORK/a.threads0"
thread_ticks "$B_PID" >"$WORK/b.threads0"
for r in $(seq "$ROUNDS"); do
    a0=$(cpu_ticks "$A_PID")
    b0=$(cpu_ticks "$B_PID")
    load "$A_PORT" "$WORK/a.json"
    pa=$LOAD_PID
    load "$B_PORT" "$WORK/b.json" "authorization: Bearer $VKEY"
    pb=$LOAD_PID
    wait "$pa" "$pb"
    sleep "$PAUSE"
    a1=$(cpu_ticks "$A_PID")
    b1=$(cpu_ticks "$B_PID")
    for side in a b; do
        [[ $(jq .errors "$WORK/$side.json") == 0 ]] ||
            echo "errors on $side: $(jq -r .first_error "$WORK/$side.json")" >&2
    done
    # total_requests counts the warmup's requests too, as the ticks count their CPU.
    a_n=$(jq .total_requests "$WORK/a.json")
    b_n=$(jq .total_requests "$WORK/b.json")
    A_SENT=$((A_SENT + a_n))
    B_SENT=$((B_SENT + b_n))
    a_cpu=$(cpu_ns_per_req $((a1 - a0)) "$a_n")
    b_cpu=$(cpu_ns_per_req $((b1 - b0)) "$b_n")
    ratio=$(awk -v a="$a_cpu" -v b="$b_cpu" 'BEGIN { printf "%.3f", a / b }')
    RATIOS+=("$ratio")
    echo "| $r | $a_cpu | $b_cpu | $ratio | $(jq '.rps | floor' "$WORK/a.json") | $(jq '.rps | floor' "$WORK/b.json") | $(jq .latency_us.p99 "$WORK/a.json") | $(jq .latency_us.p99 "$WORK/b.json") |"
done
echo
echo "Median B/A throughput over $ROUNDS rounds: $(median "${RATIOS[@]}")"
echo
# Where each gateway's CPU went, by thread, over all rounds: B's extra splits into its request
# thread (named sluice, like A's) and its spend writer's threads.
thread_ticks "$A_PID" >"$WORK/a.threads1"
thread_ticks "$B_PID" >"$WORK/b.threads1"
echo "| thread | A CPU ns/req | B CPU ns/req |"
echo "|---|--:|--:|"
per_thread() { join "$WORK/$1.threads0" "$WORK/$1.threads1" | awk -v n="$2" -v hz="$CLK_TCK" '{ printf "%s %d\n", $1, ($3 - $2) * 1e9 / hz / n }'; }
# B's probe ran before the first count, so it is left out here.
join -a1 -a2 -e 0 -o 0,1.2,2.2 <(per_thread a "$A_SENT") <(per_thread b "$((B_SENT - 1))") |
    awk '$2 + $3 > 0 { printf "| %s | %d | %d |\n", $1, $2, $3 }'
echo
echo "Spend rows written by B: $(stop_and_count_rows "$B_PID" "$KEYS" "$B_DB"), requests sent to B: $B_SENT (probe included)."
echo "$(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); both gateways on CPU $GW_CPU (--num-workers 1) at the same time, mock + both load generators on CPU $LOAD_CPU; ${DURATION} s measured after ${WARMUP} s warmup per round, ${PAUSE} s pause after each."
