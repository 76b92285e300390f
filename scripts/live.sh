# scripts/live.sh — sourced, not run: a throwaway redis-server and a
# sessiongate on free ports, both killed (and their files removed) on exit.
# Used by scripts/schemathesis and scripts/openapi-check.
#
# After `live_start`: $base (http://127.0.0.1:PORT), $work (a temp dir, with
# redis.log and service.log), SG_ISSUER_KEY and SG_ADMIN_KEY (exported).
# Extra SESSIONGATE_* settings for the service: `live_start VAR=value ...`.

live_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

command -v redis-server >/dev/null || { echo "redis-server is missing (scripts/test installs it)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
live_pids=()
live_cleanup() {
    for pid in "${live_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap live_cleanup EXIT

# The tail of the service's log, for a failure report.
live_log() {
    echo "--- service log (tail) ---" >&2
    tail -n 30 "$work/service.log" >&2 || true
}

live_start() {
    local redis_port app_port key
    redis_port="$(free_port)"
    redis-server "$live_repo/redis.conf" --port "$redis_port" --dir "$work" --daemonize no \
        --logfile "$work/redis.log" --save "" &
    live_pids+=($!)
    disown

    (cd "$live_repo" && cargo build --quiet --bin sessiongate)
    key() { head -c 36 /dev/urandom | base64 | tr '+/' '-_'; }
    export SG_ISSUER_KEY="$(key)" SG_ADMIN_KEY="$(key)"
    app_port="$(free_port)"
    env SESSIONGATE_LISTEN="127.0.0.1:$app_port" \
        SESSIONGATE_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
        SESSIONGATE_ISSUER_KEYS="$SG_ISSUER_KEY" \
        SESSIONGATE_ADMIN_KEYS="$SG_ADMIN_KEY" \
        SESSIONGATE_SIGNING_SECRET="$(key)" \
        SESSIONGATE_WORKERS=2 \
        SESSIONGATE_LOG_LEVEL=warn \
        "$@" \
        "$live_repo/target/debug/sessiongate" serve 2>"$work/service.log" &
    live_pids+=($!)
    disown

    base="http://127.0.0.1:$app_port"
    # Up to 30 s: the machine may be busy.
    for _ in $(seq 1 300); do
        curl -sf "$base/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -sf "$base/readyz" >/dev/null || { echo "sessiongate did not become ready" >&2; live_log; exit 1; }
}
