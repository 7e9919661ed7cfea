#!/usr/bin/env bash
# Keyed-vs-unkeyed A/B load harness: the gateway's cost of tenancy on a noisy machine.
#
# Starts `mock-provider` and two `sluice --num-workers 1` gateways on the same CPU: A without
# keys, B with a master key and a store, where every request carries a virtual key with a
# budget and an rpm limit and writes a spend row. Then it loads A and B in turns, ROUNDS times,
# with `sluice-load` (non-streaming chat, CONCURRENCY connections). Slow drifts of a shared VM
# (which move even the mock's own throughput by ±20% between minutes) hit both sides of a
# round alike, so each round's B/A ratio is a far steadier figure than two separate runs.
# Each turn is followed by PAUSE seconds of quiet, and a gateway's CPU is counted over its
# turn and the pause after it, so B's spend writes flushed after its load still count to B.
#
# After the last round B gets SIGTERM (which flushes its spend log) and the rows it wrote are
# counted against the requests it was sent.
#
# Environment: KEYS=sqlite|postgres|memory (B's store), ROUNDS=6, DURATION=8, WARMUP=1, PAUSE=1.5,
# CONCURRENCY=16, GW_CPU=0, LOAD_CPU=1, SKIP_BUILD=1, BENCH_PG (as in run.sh).
set -euo pipefail

KEYS=${KEYS:-sqlite}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
PAUSE=${PAUSE:-1.5}
CONCURRENCY=${CONCURRENCY:-16}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/harness.sh
source "$ROOT/benches/harness.sh"

build_unless_skipped

start_ab_pair

burst() { # PORT PID [HEADER] -> "rps p99 cpu_us_per_req requests"
    local port=$1 pid=$2 t0 t1 out
    shift 2
    local hdr=()
    [[ $# -gt 0 ]] && hdr=(-H "$1")
    t0=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" "$BIN/sluice-load" --url "http://127.0.0.1:$port/v1/chat/completions" \
        --model bench --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
        --body "$WORK/body.json" "${hdr[@]}")
    sleep "$PAUSE"
    t1=$(cpu_ticks "$pid")
    [[ $(jq .errors <<<"$out") == 0 ]] || echo "errors on port $port: $(jq -r .first_error <<<"$out")" >&2
    # total_requests counts the warmup's requests too, as the ticks count their CPU.
    jq -r --argjson ticks $((t1 - t0)) --argjson hz "$CLK_TCK" '
        "\(.rps | floor) \(.latency_us.p99) \($ticks * 1000000 / $hz / .total_requests | floor) \(.total_requests)"' <<<"$out"
}

echo "| round | A rps (no keys) | B rps ($KEYS) | B/A | A p99 µs | B p99 µs | A CPU µs/req | B CPU µs/req |"
echo "|--:|--:|--:|--:|--:|--:|--:|--:|"
RATIOS=()
for r in $(seq "$ROUNDS"); do
    read -r a_rps a_p99 a_cpu _ <<<"$(burst "$A_PORT" "$A_PID")"
    read -r b_rps b_p99 b_cpu b_n <<<"$(burst "$B_PORT" "$B_PID" "authorization: Bearer $VKEY")"
    B_SENT=$((B_SENT + b_n))
    ratio=$(awk -v a="$a_rps" -v b="$b_rps" 'BEGIN { printf "%.3f", b / a }')
    RATIOS+=("$ratio")
    echo "| $r | $a_rps | $b_rps | $ratio | $a_p99 | $b_p99 | $a_cpu | $b_cpu |"
done
echo
echo "Median B/A over $ROUNDS rounds: $(median "${RATIOS[@]}")"
echo
echo "Spend rows written by B: $(stop_and_count_rows "$B_PID" "$KEYS" "$B_DB"), requests sent to B: $B_SENT (probe included)."
echo "$(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); both gateways on CPU $GW_CPU (--num-workers 1), mock + load generator on CPU $LOAD_CPU; ${DURATION} s measured after ${WARMUP} s warmup per turn, ${PAUSE} s pause after each; CPU per request = utime+stime over the turn and its pause / requests sent (warmup included)."
