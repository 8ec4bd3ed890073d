# shellcheck shell=bash
# Shared by scripts/bench and scripts/capacity: starting, watching and
# stopping release relays on loopback, and reading numbers off them.
# The caller sets RELAY_BIN, PREFIX (Redis key prefix) and EXCHANGE.

# The relays run on environment variables only; nothing inherited from ours.
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep -E '^SENDTALK_RELAY' || true)

# start_relay HTTP_PORT ADMIN_PORT AMQP_URI SPOOL_DIR LOG: starts a relay in
# the background; its pid is in $! afterwards.
start_relay() {
    env -u RUST_LOG \
        SENDTALK_RELAY__SINK=amqp \
        SENDTALK_RELAY__HTTP__LISTEN="127.0.0.1:$1" \
        SENDTALK_RELAY__ADMIN__LISTEN="127.0.0.1:$2" \
        SENDTALK_RELAY__AUTH__MODE=hmac-sha256 \
        SENDTALK_RELAY__AUTH__SECRETS=bench-secret \
        SENDTALK_RELAY__DEDUP__BACKEND=redis \
        SENDTALK_RELAY__DEDUP__KEY_PREFIX="$PREFIX" \
        SENDTALK_RELAY__REDIS__URL=redis://127.0.0.1:6379 \
        SENDTALK_RELAY__AMQP__URI="$3" \
        SENDTALK_RELAY__AMQP__EXCHANGE="$EXCHANGE" \
        SENDTALK_RELAY__SPOOL__DIR="$4" \
        SENDTALK_RELAY__LOG__LEVEL=warn \
        "$RELAY_BIN" serve >>"$5.out" 2>>"$5" &
}

# stop_relay PID: SIGTERM, bounded wait (grace is 25 s; SIGKILL after 40 s).
stop_relay() {
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid"
    for _ in $(seq 1 400); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "relay $pid did not stop within 40 s; SIGKILL" >&2
        kill -KILL "$pid"
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# wait_ready ADMIN_PORT PID LOG: at most 30 s.
wait_ready() {
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$1/readyz" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    echo "relay did not become ready; its log:" >&2
    cat "$3" >&2
    return 1
}

# metric ADMIN_PORT NAME: one unlabelled value from /metrics (empty while
# the relay does not answer).
metric() {
    { curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null || true; } | awk -v n="$2" '$1 == n { print $2 }'
}

# redis_snapshot: "cpu_seconds command_usec command_calls" of the whole
# (shared) Redis.
redis_snapshot() {
    { redis-cli -h 127.0.0.1 -p 6379 info cpu; redis-cli -h 127.0.0.1 -p 6379 info commandstats; } |
        tr -d '\r' | awk -F'[:,=]' '
        /^used_cpu_sys:/ || /^used_cpu_user:/ { cpu += $2 }
        /^cmdstat_/ { for (i = 2; i < NF; i++) { if ($i == "usec") usec += $(i + 1); if ($i == "calls") calls += $(i + 1) } }
        END { printf "%.6f %d %d\n", cpu, usec, calls }'
}

# delete_bench_state: the Redis keys under PREFIX and the exchange.
delete_bench_state() {
    if command -v redis-cli >/dev/null 2>&1; then
        local n
        n=$(redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "${PREFIX}*" |
            xargs -r -n 1000 redis-cli -h 127.0.0.1 -p 6379 DEL | awk '{s+=$1} END {print s+0}')
        echo "deleted $n Redis keys under ${PREFIX}"
        "$LOADGEN" cleanup --exchange "$EXCHANGE" >/dev/null && echo "deleted exchange $EXCHANGE"
    else
        "$LOADGEN" cleanup --exchange "$EXCHANGE" --redis-prefix "$PREFIX"
    fi
}

field() { # field LINE KEY
    tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"
}

median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "nan"; else printf "%.3f", a / b }'; }
