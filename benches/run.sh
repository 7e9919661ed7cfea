#!/usr/bin/env bash
# Sluice end-to-end load harness: mock provider directly vs. through the gateway.
#
# Builds the release binaries, starts `mock-provider` (CPU 1) and `sluice --num-workers 1`
# (CPU 0), and drives both with `sluice-load` (CPU 1) for non-streaming and streaming chat
# completions at several concurrencies. Prints a markdown table (also written to
# target/bench-results.md; raw sluice-load JSON goes to target/bench-results.jsonl).
#
# Environment overrides:
#   DURATION=10        measured seconds per run
#   WARMUP=2           warmup seconds per run (not measured)
#   CONCURRENCY="1 16 64"
#   MODES="chat stream"
#   GW_CPU=0 LOAD_CPU=1  CPUs for the gateway and for mock + load generator
#   SKIP_BUILD=1       use the binaries already in target/release
#   CARGO_TARGET_DIR   as for cargo (default: target)
#   SLUICE_LOG         passed through to the gateway (its log level)
#   KEYS=none          none: no auth (baseline); sqlite or postgres: every request carries a
#                      virtual key with a budget and an rpm limit, spend goes to that store
#                      (postgres: a fresh database on $BENCH_PG, default the local server), and
#                      the spend rows written are counted against the requests sent
# See benches/README.md for what each column means.
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
MODES=${MODES:-"chat stream"}
KEYS=${KEYS:-none}
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
GW_CPU=${GW_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
RESULTS=$TARGET_DIR/bench-results.md
RAW=$TARGET_DIR/bench-results.jsonl

die() {
    echo "run.sh: $*" >&2
    exit 1
}

for tool in taskset jq curl getconf; do
    command -v "$tool" >/dev/null || die "needs \`$tool\` on PATH"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Give each process up to 2 s to exit, then kill it.
        for _ in $(seq 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 && -f $WORK/sluice.log ]]; then
        echo "--- last lines of the gateway log ---" >&2
        tail -n 30 "$WORK/sluice.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${SKIP_BUILD:-} ]]; then
    echo "building release binaries..." >&2
    cargo build --release -p sluice-proxy -p sluice-tests -p sluice-benches >&2
fi
for b in sluice mock-provider sluice-load; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing (build failed, or SKIP_BUILD set too early)"
done

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        2>/dev/null || echo $((20000 + RANDOM % 30000))
}

# Clock ticks (utime + stime, all threads) a process has used so far.
cpu_ticks() {
    # Fields after the `(comm)` one: state is field 3, utime 14, stime 15.
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*") "}
    awk '{ print $12 + $13 }' <<<"$stat"
}

# --- request body: a ~2 KB chat completion ---------------------------------------------------
BODY=$WORK/body.json
FILLER="The quick brown fox jumps over the lazy dog while the gateway forwards tokens. "
USER_TEXT=""
while ((${#USER_TEXT} < 1850)); do USER_TEXT+=$FILLER; done
jq -cn --arg sys "You are a concise assistant. Answer in one short paragraph." \
    --arg user "Summarise the following text: $USER_TEXT" \
    '{model: "bench", max_tokens: 64, temperature: 0,
      messages: [{role: "system", content: $sys}, {role: "user", content: $user}]}' >"$BODY"
BODY_BYTES=$(wc -c <"$BODY")

# --- mock provider ---------------------------------------------------------------------------
taskset -c "$LOAD_CPU" "$BIN/mock-provider" --port 0 --name bench >"$WORK/mock.out" 2>"$WORK/mock.err" </dev/null &
PIDS+=($!)
MOCK_PORT=""
for _ in $(seq 100); do
    if read -r word port <"$WORK/mock.out" 2>/dev/null && [[ $word == LISTENING ]]; then
        MOCK_PORT=$port
        break
    fi
    sleep 0.1
done
[[ -n $MOCK_PORT ]] || die "mock-provider did not print LISTENING: $(cat "$WORK/mock.err")"

# --- gateway ---------------------------------------------------------------------------------
MOCK_BASE=http://127.0.0.1:$MOCK_PORT/v1
cat >"$WORK/config.yaml" <<EOF
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: $MOCK_BASE
      api_key: sk-bench
  - model_name: bench-stream
    litellm_params:
      model: openai/stream-20
      api_base: $MOCK_BASE
      api_key: sk-bench
EOF
MASTER=sk-bench-master
case $KEYS in
none) ;;
sqlite) DB_URL="sqlite://$WORK/bench.db" ;;
postgres)
    PG_DB=sluice_bench_$$
    psql "$BENCH_PG/postgres" -qc "CREATE DATABASE $PG_DB" >/dev/null || die "cannot create $PG_DB on $BENCH_PG"
    DB_URL="$BENCH_PG/$PG_DB"
    ;;
*) die "KEYS must be none, sqlite or postgres" ;;
esac
if [[ $KEYS != none ]]; then
    printf 'general_settings:\n  master_key: %s\n  database_url: "%s"\n  proxy_batch_write_at: 1\n' \
        "$MASTER" "$DB_URL" >>"$WORK/config.yaml"
fi
GW_PORT=$(free_port)
(cd "$WORK" && exec taskset -c "$GW_CPU" "$BIN/sluice" --config "$WORK/config.yaml" \
    --host 127.0.0.1 --port "$GW_PORT" --num-workers 1 >"$WORK/sluice.log" 2>&1 </dev/null) &
GW_PID=$!
PIDS+=("$GW_PID")
for i in $(seq 200); do
    kill -0 "$GW_PID" 2>/dev/null || die "sluice exited during startup"
    curl -sf -o /dev/null "http://127.0.0.1:$GW_PORT/health/liveliness" && break
    ((i < 200)) || die "sluice not live on port $GW_PORT after 20 s"
    sleep 0.1
done

AUTH=()
if [[ $KEYS != none ]]; then
    VKEY=$(curl -sf "http://127.0.0.1:$GW_PORT/key/generate" -H "Authorization: Bearer $MASTER" \
        -H 'content-type: application/json' \
        -d '{"key_alias": "bench", "max_budget": 1000000000, "rpm_limit": 1000000000}' | jq -r .key)
    [[ $VKEY == sk-* ]] || die "could not generate a virtual key"
    AUTH=(-H "Authorization: Bearer $VKEY")
fi

# One request per route before measuring, so a broken setup fails loudly and early.
for model in bench bench-stream; do
    stream=false
    [[ $model == bench-stream ]] && stream=true
    code=$(jq -c --arg m "$model" --argjson s "$stream" '.model = $m | .stream = $s' "$BODY" |
        curl -s -o "$WORK/probe.out" -w '%{http_code}' -H 'content-type: application/json' "${AUTH[@]}" \
            --data-binary @- "http://127.0.0.1:$GW_PORT/v1/chat/completions")
    [[ $code == 200 ]] || die "probe through the gateway (model $model) answered $code: $(head -c 500 "$WORK/probe.out")"
done

CLK_TCK=$(getconf CLK_TCK)

# load URL MODEL STREAM(0|1) CONCURRENCY -> sluice-load JSON on stdout
load() {
    local args=(--url "$1" --model "$2" --concurrency "$4" --duration "$DURATION"
        --warmup "$WARMUP" --body "$BODY")
    [[ $3 == 1 ]] && args+=(--stream)
    [[ ${#AUTH[@]} -gt 0 ]] && args+=("${AUTH[@]}")
    taskset -c "$LOAD_CPU" "$BIN/sluice-load" "${args[@]}"
}

: >"$RAW"
ROWS=()
for mode in $MODES; do
    case $mode in
    chat) direct_model=bench gw_model=bench stream=0 ;;
    stream) direct_model=stream-20 gw_model=bench-stream stream=1 ;;
    *) die "unknown mode $mode (chat|stream)" ;;
    esac
    for c in $CONCURRENCY; do
        echo "[$mode c=$c] direct..." >&2
        direct=$(load "$MOCK_BASE/chat/completions" "$direct_model" "$stream" "$c")
        echo "[$mode c=$c] gateway..." >&2
        t0=$(cpu_ticks "$GW_PID")
        gw=$(load "http://127.0.0.1:$GW_PORT/v1/chat/completions" "$gw_model" "$stream" "$c")
        t1=$(cpu_ticks "$GW_PID")
        jq -c --arg mode "$mode" --arg target direct '. + {mode: $mode, target: $target}' <<<"$direct" >>"$RAW"
        jq -c --arg mode "$mode" --arg target gateway '. + {mode: $mode, target: $target}' <<<"$gw" >>"$RAW"
        for j in "$direct" "$gw"; do
            err=$(jq -r '.first_error // empty' <<<"$j")
            [[ -z $err ]] || echo "[$mode c=$c] $(jq -r .url <<<"$j"): errors=$(jq .errors <<<"$j"), first: $err" >&2
        done
        ROWS+=("$(jq -rn --argjson d "$direct" --argjson g "$gw" --arg mode "$mode" --argjson c "$c" \
            --argjson ticks $((t1 - t0)) --argjson hz "$CLK_TCK" '
            def lat($x; $k): if $x.latency_us then $x.latency_us[$k] else null end;
            def diff($a; $b): if $a != null and $b != null then $a - $b else null end;
            def fmt: if . == null then "–" else tostring end;
            def ttfb($x): if $x.ttfb_us then $x.ttfb_us.p50 else null end;
            [ $mode, $c,
              ($d.rps | floor), ($g.rps | floor),
              lat($d; "p50"), lat($g; "p50"), diff(lat($g; "p50"); lat($d; "p50")),
              lat($d; "p99"), lat($g; "p99"), diff(lat($g; "p99"); lat($d; "p99")),
              ttfb($d), ttfb($g),
              (if $g.total_requests > 0
               then ($ticks * 1000000 / $hz / $g.total_requests | floor) else null end),
              "\($d.errors)/\($g.errors)"
            ] | map(fmt) | "| " + join(" | ") + " |"')")
    done
done

HWM=$(awk '/^VmHWM:/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$GW_PID/status")

SPEND_LINE=""
if [[ $KEYS != none ]]; then
    # Stop the gateway (SIGTERM flushes the spend log), then count its rows.
    kill -TERM "$GW_PID"
    for _ in $(seq 300); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    SENT=$(jq -s '[.[] | select(.target == "gateway") | .total_requests] | add + 2' "$RAW")
    if [[ $KEYS == sqlite ]]; then
        ROWS_WRITTEN=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from sluice_spend_logs').fetchone()[0])" "$WORK/bench.db")
    else
        ROWS_WRITTEN=$(psql "$DB_URL" -qAtc 'select count(*) from sluice_spend_logs')
        psql "$BENCH_PG/postgres" -qc "DROP DATABASE $PG_DB WITH (FORCE)" >/dev/null || true
    fi
    SPEND_LINE="Virtual key with a budget and an rpm limit on every request ($KEYS store): spend rows written $ROWS_WRITTEN, requests sent $SENT (probes included)."
fi

{
    echo "## Sluice load harness ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    echo "$(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); gateway on CPU $GW_CPU" \
        "(--num-workers 1), mock + load generator on CPU $LOAD_CPU. ${DURATION} s measured after" \
        "${WARMUP} s warmup per run, ${BODY_BYTES}-byte chat body, streams of 20 chunks." \
        "Latencies in µs (stream: until the end of the SSE body)."
    echo
    echo "| mode | conc | direct rps | gateway rps | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 | direct TTFB p50 | gateway TTFB p50 | gateway CPU µs/req | errors d/g |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    printf '%s\n' "${ROWS[@]}"
    echo
    [[ -z $SPEND_LINE ]] || echo "$SPEND_LINE"
    echo
    echo "Gateway peak RSS (VmHWM) at the end: $HWM. CPU per request is utime+stime over the whole gateway run (warmup included) / requests sent; clock tick = $((1000000 / CLK_TCK)) µs."
} | tee "$RESULTS"
echo "(written to $RESULTS; raw JSON in $RAW)" >&2
