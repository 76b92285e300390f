# bench/lib.sh — shared by bench/run and bench/smoke (sourced, not run).
#
# Starts throwaway redis-server and sessiongate processes on free loopback
# ports, each with its own temporary directory, and stops every process it
# started (by pid, never by name) when the calling script exits. The
# machine's own Redis on 6379 is never touched: ports are drawn from
# 20000-59999 and checked free first.

BENCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_TMP="$(mktemp -d "${TMPDIR:-/tmp}/sessiongate-bench.XXXXXX")"
BENCH_PIDS=()
BENCH_KEEP_TMP="${BENCH_KEEP_TMP:-0}"

bench_log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
bench_die() { bench_log "error: $*"; exit 2; }

bench_cleanup() {
    local status=$?
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        # Give each process 5 s to stop, then kill it.
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ] || [ "$BENCH_KEEP_TMP" = 1 ]; then
        bench_log "logs and data kept in $BENCH_TMP"
    else
        rm -rf "$BENCH_TMP"
    fi
    exit "$status"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Installs Debian packages for missing commands: bench_need CMD:PACKAGE...
bench_need() {
    local missing=() item
    for item in "$@"; do
        command -v "${item%%:*}" >/dev/null 2>&1 || missing+=("${item#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        bench_log "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null \
            || bench_die "cannot install ${missing[*]}"
    fi
}

# A random secret of N bytes as 2N hex characters.
bench_secret() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# True when something accepts connections on 127.0.0.1:PORT.
bench_port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A free loopback port (not 6379, not in use).
bench_free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if [ "$port" != 6379 ] && ! bench_port_busy "$port" \
            && ! grep -q "$(printf ':%04X ' "$port")" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    bench_die "no free port found"
}

# bench_start_redis NAME: starts redis-server from the project's redis.conf
# on a free port with data in $BENCH_TMP/NAME; sets REDIS_PORT and REDIS_PID.
bench_start_redis() {
    local name="$1" dir="$BENCH_TMP/$1"
    mkdir -p "$dir"
    REDIS_PORT="$(bench_free_port)"
    redis-server "$BENCH_REPO/redis.conf" --dir "$dir" --port "$REDIS_PORT" \
        --daemonize no --logfile "$dir/redis.log" &
    REDIS_PID=$!
    BENCH_PIDS+=("$REDIS_PID")
    for _ in $(seq 1 100); do
        if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then
            return 0
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$dir/redis.log" >&2 || true
    bench_die "redis-server ($name) did not answer PING"
}

# The keys every instance of one run shares (generated, never printed).
bench_keys() {
    export SESSIONGATE_ISSUER_KEYS="issuer-$(bench_secret 24)"
    export SESSIONGATE_ADMIN_KEYS="admin-$(bench_secret 24)"
    export SESSIONGATE_SIGNING_SECRET="$(bench_secret 32)"
}

# bench_start_sessiongate NAME BINARY REDIS_PORT [VAR=VALUE...]: starts
# `sessiongate serve` on a free port (one worker unless overridden); waits
# for /readyz; sets SG_PORT and SG_PID.
bench_start_sessiongate() {
    local name="$1" bin="$2" redis_port="$3"
    shift 3
    local log="$BENCH_TMP/$name.log"
    SG_PORT="$(bench_free_port)"
    env SESSIONGATE_LISTEN="127.0.0.1:$SG_PORT" \
        SESSIONGATE_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
        SESSIONGATE_WORKERS=1 \
        SESSIONGATE_LOG_FORMAT=json \
        "$@" "$bin" serve >"$log" 2>&1 &
    SG_PID=$!
    BENCH_PIDS+=("$SG_PID")
    for _ in $(seq 1 100); do
        if [ "$(bench_http_status "$SG_PORT" /readyz)" = 200 ]; then
            return 0
        fi
        kill -0 "$SG_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$log" >&2 || true
    bench_die "sessiongate ($name) did not become ready on port $SG_PORT"
}

# bench_stop PID: stops one process this script started.
bench_stop() {
    local pid="$1" kept=() p
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${BENCH_PIDS[@]}"; do
        [ "$p" = "$pid" ] || kept+=("$p")
    done
    BENCH_PIDS=("${kept[@]}")
}

# bench_http_status PORT PATH: the status code of GET PATH on loopback.
bench_http_status() {
    local status
    status="$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
        IFS=" " read -r -t 2 _ code _ <&3 && echo "$code"
    )" 2>/dev/null || true
    echo "${status:-000}"
}

# A Redis INFO field: bench_redis_info PORT SECTION FIELD
bench_redis_info() {
    redis-cli -p "$1" info "$2" | tr -d '\r' | awk -F: -v f="$3" '$1 == f { print $2 }'
}

# Calls of one command from INFO commandstats (0 when never called).
bench_redis_calls() {
    local line
    line="$(redis-cli -p "$1" info commandstats | tr -d '\r' | grep "^cmdstat_$2:" || true)"
    line="${line#*calls=}"
    echo "${line%%,*}" | grep -E '^[0-9]+$' || echo 0
}

# CPU seconds (user + system) a process has used so far.
bench_cpu_seconds() {
    local stat ticks
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
    stat="${stat##*) }"
    # after "pid (comm) ": field 3 is state, so utime and stime are 12th and 13th here
    ticks="$(echo "$stat" | awk '{ print $12 + $13 }')"
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}

# Resident memory of a process, in KiB.
bench_rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
