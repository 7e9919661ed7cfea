# Shared parts of the load harnesses (`run.sh`, `ab.sh`): sourced, not run.
#
# Expects ROOT set, and sets what is not set already: BIN (the release binaries under
# CARGO_TARGET_DIR or target/), GW_CPU=0, LOAD_CPU=1 and BENCH_PG (the local Postgres server).
# Gives a scratch directory $WORK that is removed on
# exit together with every process started here, and helpers to write the chat body, start the
# mock provider and gateways, make a virtual key and probe a route.
# shellcheck shell=bash

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

for tool in taskset jq curl getconf; do
    command -v "$tool" >/dev/null || die "needs \`$tool\` on PATH"
done

BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
GW_CPU=${GW_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
cd "$ROOT"

CLK_TCK=$(getconf CLK_TCK)
MASTER=sk-bench-master
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
PIDS=()
PG_DBS=()
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
    if [[ $rc -ne 0 ]]; then
        for log in "$WORK"/sluice*.log; do
            [[ -f $log ]] || continue
            echo "--- last lines of $(basename "$log") ---" >&2
            tail -n 30 "$log" >&2 || true
        done
    fi
    for db in "${PG_DBS[@]}"; do
        psql "$BENCH_PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# build_unless_skipped: the release binaries (unless SKIP_BUILD is set), which must then exist.
build_unless_skipped() {
    if [[ -z ${SKIP_BUILD:-} ]]; then
        echo "building release binaries..." >&2
        cargo build --release -p sluice-proxy -p sluice-tests -p sluice-benches >&2
    fi
    require_binaries
}

require_binaries() {
    for b in sluice mock-provider sluice-load; do
        [[ -x $BIN/$b ]] || die "$BIN/$b missing (build failed, or SKIP_BUILD set too early)"
    done
}

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

# thread_ticks PID: "NAME TICKS" per thread name (threads of one name summed), sorted by name;
# spaces in names become underscores.
thread_ticks() {
    local t stat
    for t in /proc/"$1"/task/*; do
        stat=$(<"$t/stat") || continue
        printf '%s %s\n' "$(tr ' ' '_' <"$t/comm")" "$(awk '{ print $12 + $13 }' <<<"${stat##*") "}")"
    done | awk '{ sum[$1] += $2 } END { for (n in sum) print n, sum[n] }' | sort
}

# make_body FILE: a ~2 KB chat completion for model `bench`.
make_body() {
    local filler="The quick brown fox jumps over the lazy dog while the gateway forwards tokens. "
    local user_text=""
    while ((${#user_text} < 1850)); do user_text+=$filler; done
    jq -cn --arg sys "You are a concise assistant. Answer in one short paragraph." \
        --arg user "Summarise the following text: $user_text" \
        '{model: "bench", max_tokens: 64, temperature: 0,
          messages: [{role: "system", content: $sys}, {role: "user", content: $user}]}' >"$1"
}

# start_mock: the mock provider on LOAD_CPU; sets MOCK_PORT and MOCK_BASE.
start_mock() {
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
    MOCK_BASE=http://127.0.0.1:$MOCK_PORT/v1
}

# start_gateway NAME KEYS: a gateway on GW_CPU routing `bench` and `bench-stream` to the mock;
# KEYS none (no auth), memory, sqlite or postgres (a master key and that store). Sets GW_PORT,
# GW_PID and, for a store, DB_URL (a fresh SQLite file or Postgres database).
# BATCH_WRITE_AT: the spend writer's interval in seconds (default 1).
start_gateway() {
    local name=$1 keys=$2 config=$WORK/config-$1.yaml
    cat >"$config" <<YAML
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
YAML
    DB_URL=""
    case $keys in
    none) ;;
    memory) DB_URL="memory:" ;;
    sqlite) DB_URL="sqlite://$WORK/$name.db" ;;
    postgres)
        local db=sluice_bench_$$_$name
        psql "$BENCH_PG/postgres" -qc "CREATE DATABASE $db" >/dev/null || die "cannot create $db on $BENCH_PG"
        PG_DBS+=("$db")
        DB_URL="$BENCH_PG/$db"
        ;;
    *) die "KEYS must be none, memory, sqlite or postgres" ;;
    esac
    if [[ $keys != none ]]; then
        printf 'general_settings:\n  master_key: %s\n  database_url: "%s"\n  proxy_batch_write_at: %s\n' \
            "$MASTER" "$DB_URL" "${BATCH_WRITE_AT:-1}" >>"$config"
    fi
    GW_PORT=$(free_port)
    # GW_WRAPPER (an array, may be unset): a command the gateway runs under, e.g. valgrind.
    (cd "$WORK" && exec taskset -c "$GW_CPU" ${GW_WRAPPER[@]+"${GW_WRAPPER[@]}"} "$BIN/sluice" --config "$config" \
        --host 127.0.0.1 --port "$GW_PORT" --num-workers 1 >"$WORK/sluice-$name.log" 2>&1 </dev/null) &
    GW_PID=$!
    PIDS+=("$GW_PID")
    for i in $(seq 200); do
        kill -0 "$GW_PID" 2>/dev/null || die "sluice ($name) exited during startup"
        curl -sf -o /dev/null "http://127.0.0.1:$GW_PORT/health/liveliness" && break
        ((i < 200)) || die "sluice ($name) not live on port $GW_PORT after 20 s"
        sleep 0.1
    done
}

# generate_key PORT: a virtual key with a (large) budget and rpm limit, made with the master key.
generate_key() {
    local key
    key=$(curl -sf "http://127.0.0.1:$1/key/generate" -H "Authorization: Bearer $MASTER" \
        -H 'content-type: application/json' \
        -d '{"key_alias": "bench", "max_budget": 1000000000, "rpm_limit": 1000000000}' | jq -r .key)
    [[ $key == sk-* ]] || die "could not generate a virtual key"
    echo "$key"
}

# probe PORT BODY MODEL STREAM [CURL ARGS...]: one request, which must answer 200.
probe() {
    local port=$1 body=$2 model=$3 stream=$4 code
    shift 4
    code=$(jq -c --arg m "$model" --argjson s "$stream" '.model = $m | .stream = $s' "$body" |
        curl -s -o "$WORK/probe.out" -w '%{http_code}' -H 'content-type: application/json' "$@" \
            --data-binary @- "http://127.0.0.1:$port/v1/chat/completions")
    [[ $code == 200 ]] || die "probe on port $port (model $model) answered $code: $(head -c 500 "$WORK/probe.out")"
}

# stop_and_count_rows PID KEYS: SIGTERM the gateway (which flushes its spend log), wait for it,
# and print the spend rows in its store (DB_URL as start_gateway left it for that gateway).
stop_and_count_rows() {
    local pid=$1 keys=$2 url=$3
    kill -TERM "$pid"
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    case $keys in
    sqlite)
        python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from sluice_spend_logs').fetchone()[0])" \
            "${url#sqlite://}"
        ;;
    postgres) psql "$url" -qAtc 'select count(*) from sluice_spend_logs' ;;
    *) echo "n/a" ;;
    esac
}

# start_ab_pair: for the keyed-vs-unkeyed harnesses, the chat body, the mock, gateway A without
# keys and gateway B with KEYS' store, a virtual key for B, and one probe of each. Sets A_PORT,
# A_PID, B_PORT, B_PID, B_DB, VKEY, and B_SENT=1 (the probe).
start_ab_pair() {
    make_body "$WORK/body.json"
    start_mock
    start_gateway a none
    A_PORT=$GW_PORT A_PID=$GW_PID
    start_gateway b "$KEYS"
    B_PORT=$GW_PORT B_PID=$GW_PID B_DB=$DB_URL
    VKEY=$(generate_key "$B_PORT")
    probe "$A_PORT" "$WORK/body.json" bench false
    probe "$B_PORT" "$WORK/body.json" bench false -H "authorization: Bearer $VKEY"
    B_SENT=1
}

# median VALUE...: the median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
