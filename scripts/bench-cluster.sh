#!/usr/bin/env bash
# Fan-out on one node against the same fan-out spread over a 3-node cluster,
# both on the shared store (CQL at $CHORUS_CQL, default 127.0.0.1:9042:
# `bash scripts/cassandra.sh start`), in one command, so the figures compare.
# Every port is picked by the OS on 127.0.0.1; the nodes are stopped at the end.
#
#   cargo build --release -p chorus-node -p chorus-loadtest
#   bash scripts/bench-cluster.sh [SUBSCRIBERS] [RATE] [SECONDS]
#
# Writes bench-cluster/{single,cluster}.json (chorus-loadtest reports) and
# prints, for each run, publish-to-delivery latency and how many frames the
# room's owner sent to other nodes per message.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
subs="${1:-300}"; rate="${2:-100}"; secs="${3:-15}"
cql="${CHORUS_CQL:-127.0.0.1:9042}"
bin=target/release/chorus
lt=target/release/chorus-loadtest
out=bench-cluster
mkdir -p "$out"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
api_key=bench-api-key-0123

config() { # $1: keyspace, $2: cluster (yes|no)
    cat <<TOML
[auth]
api_key = "$api_key"
[limits]
rate_per_sec = 1000
rate_burst = 1000
[storage]
backend = "scylla"
[storage.scylla]
contact_points = ["$cql"]
keyspace = "$1"
TOML
    if [[ "$2" == yes ]]; then cat <<TOML
[cluster]
secret = "bench-cluster-secret-0123456789"
listen = "127.0.0.1:0"
transport_listen = "127.0.0.1:0"
TOML
    fi
}

start() { # $1: config, $2: id, $3: seed or ""; prints the HTTP address
    local log="$work/$2.out" args=(start --listen 127.0.0.1:0 --node-id "$2" --config "$1")
    [[ -n "$3" ]] && args+=(--seed "$3")
    "$bin" "${args[@]}" >"$log" 2>"$work/$2.err" &
    pids+=($!)
    for _ in $(seq 300); do
        if grep -q '^listening on ' "$log"; then sed -n 's/^listening on //p' "$log"; return; fi
        sleep 0.1
    done
    echo "node $2 did not start: $(cat "$work/$2.err")" >&2; exit 1
}

metric() { # $1: addr, $2: metric name
    curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'
}

run() { # $1: name, rest: targets
    local name="$1"; shift
    local targets=()
    for t in "$@"; do targets+=(--target "$t"); done
    local before=() t
    for t in "$@"; do before+=("$(metric "$t" chorus_cluster_remote_deliveries_total)"); done
    "$lt" fanout --rooms 1 --subscribers "$subs" --publishers 2 --messages 1000000 \
        --rate "$rate" --duration-secs "$secs" "${targets[@]}" --api-key "$api_key" \
        --out "$out/$name.json" | tail -n 25
    local sent=0 i=0 published=0
    for t in "$@"; do
        local now; now="$(metric "$t" chorus_cluster_remote_deliveries_total)"
        sent=$(awk -v a="$sent" -v b="${now:-0}" -v c="${before[$i]:-0}" 'BEGIN {print a + b - c}')
        i=$((i + 1))
    done
    echo "== $name: frames sent to other nodes' hubs during the run: $sent"
}

ks="chorus_bench_$(date +%s)"
config "${ks}_single" no >"$work/single.toml"
single="$(start "$work/single.toml" single "")"
run single "$single"
kill -TERM "${pids[0]}"; wait "${pids[0]}" || true; pids=()

config "${ks}_cluster" yes >"$work/cluster.toml"
a="$(start "$work/cluster.toml" bench-a "")"
seed="$("$bin" status --json --target "$a" --config "$work/cluster.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["members"][0]["gossip"])')"
b="$(start "$work/cluster.toml" bench-b "$seed")"
c="$(start "$work/cluster.toml" bench-c "$seed")"
for _ in $(seq 100); do
    up="$("$bin" status --json --target "$c" --config "$work/cluster.toml" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["view"]))')"
    [[ "$up" == 3 ]] && break
    sleep 0.2
done
run cluster "$a" "$b" "$c"
"$lt" compare "$out/single.json" "$out/cluster.json" | head -n 40
