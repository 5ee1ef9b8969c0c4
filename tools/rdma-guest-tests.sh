#!/usr/bin/env bash
# The RDMA checks CI runs INSIDE the soft-RoCE guest (tools/softroce.sh), in the repository
# root:
#
#   tools/softroce.sh bash tools/rdma-guest-tests.sh [TEST_BINARY...]
#
#   1. ibv_devinfo: the rxe device is there and its port is PORT_ACTIVE;
#   2. perftest ib_read_bw loopback: server and client in this guest on the one device, the
#      client reading from $FERROPLASMA_RDMA_ADDR, 64 KiB messages for a few seconds; the
#      average bandwidth is printed (a reference figure for the transport's own numbers);
#   3. every TEST_BINARY (libtest executables built on the host, e.g. by
#      `cargo test --no-run`) runs with --test-threads=1 --nocapture, from the directory
#      cargo would use (its package's root, when given as DIR=BINARY; else the current one).
# Exits non-zero if any step fails; every test binary runs even after one fails. A test that
# prints "SKIPPED: no ..." (no RDMA device, no memory windows, no verbs header, no readelf)
# fails the run too: here all of them must be there.
#
# Needs the variables tools/softroce.sh exports: FERROPLASMA_RDMA_DEVICE, FERROPLASMA_RDMA_ADDR
# and FERROPLASMA_RDMA_GID_INDEX.
# Knobs: RDMA_GUEST_BW_SECONDS (default 3), RDMA_GUEST_PERFTEST_PORT (default 18515; a retry
# uses the next port).
set -euo pipefail

device=${FERROPLASMA_RDMA_DEVICE:?run this inside tools/softroce.sh}
addr=${FERROPLASMA_RDMA_ADDR:?run this inside tools/softroce.sh}
gid=${FERROPLASMA_RDMA_GID_INDEX:?run this inside tools/softroce.sh}
bw_seconds=${RDMA_GUEST_BW_SECONDS:-3}
port=${RDMA_GUEST_PERFTEST_PORT:-18515}
started=$(date +%s)
say() { printf '[rdma-guest %3ss] %s\n' "$(($(date +%s) - started))" "$*"; }

say "ibv_devinfo -d $device"
info=$(ibv_devinfo -d "$device")
echo "$info"
grep -q 'state:[[:space:]]*PORT_ACTIVE' <<<"$info" || { say "FAIL: $device port is not active"; exit 1; }

# One server + client run of ib_read_bw. perftest exchanges the QP data over TCP on its port
# before the RDMA traffic: the client starts once the server listens there (awaited, with a
# 60 s limit), not after a guessed sleep. -F: emulated CPUs give perftest odd frequency
# readings, which it would otherwise refuse.
# Sets `bw` (MB/s) and returns 0; returns 2 when perftest's clock calibration failed (see
# below), 1 on any other failure.
read_bw_once() {
  local port=$1 server server_log client_out client_status=0 server_status=0 deadline
  local args=(-d "$device" -x "$gid" -s 65536 -D "$bw_seconds" -F -p "$port")
  server_log=$(mktemp)
  timeout 120 ib_read_bw "${args[@]}" >"$server_log" 2>&1 &
  server=$!
  deadline=$((SECONDS + 60))
  until [[ -n $(ss -Hltn "sport = :$port") ]]; do
    if ! kill -0 "$server" 2>/dev/null || ((SECONDS > deadline)); then
      cat "$server_log"
      say "the ib_read_bw server did not start listening on port $port"
      kill "$server" 2>/dev/null
      return 1
    fi
    sleep 0.1
  done
  client_out=$(timeout 120 ib_read_bw "${args[@]}" "$addr" 2>&1) || client_status=$?
  wait "$server" || server_status=$?
  echo "$client_out"
  if ((client_status != 0 || server_status != 0)); then
    echo "--- server:"
    cat "$server_log"
    rm -f "$server_log"
    say "ib_read_bw client exit status $client_status, server $server_status"
    return 1
  fi
  rm -f "$server_log"
  # The result line follows the "#bytes #iterations BW peak[MB/sec] BW average[MB/sec] ..."
  # header: bytes, iterations, peak, average, message rate.
  bw=$(awk '/^ *#bytes/ { header = 1; next } header && NF >= 4 && $1 == 65536 { print $4; exit }' \
    <<<"$client_out")
  awk -v bw="${bw:-0}" 'BEGIN { exit !(bw > 0) }' && return 0
  # perftest measures time in TSC cycles and calibrates them against gettimeofday first; on
  # a loaded host the emulated guest's samples can miss its linearity check ("Correlation
  # coefficient r^2: ... < 0.9"), and it then reports 0.00 MB/s although the transfer ran.
  grep -q 'Correlation coefficient' <<<"$client_out" && return 2
  say "no ib_read_bw bandwidth in the client's output"
  return 1
}

say "ib_read_bw loopback on $device: 64 KiB messages, ${bw_seconds}s, client -> $addr"
bw=
for attempt in 1 2 3; do
  status=0
  read_bw_once "$((port + attempt - 1))" || status=$?
  ((status == 0)) && break
  ((status == 2)) || { say "FAIL: ib_read_bw"; exit 1; }
  say "perftest's clock calibration failed (host too busy): attempt $attempt of 3"
done
((status == 0)) || { say "FAIL: ib_read_bw: the clock calibration failed 3 times"; exit 1; }
say "ib_read_bw 64 KiB on $device (soft-RoCE, emulated): BW average ${bw} MB/s"

failed=()
for arg in "$@"; do
  # DIR=BINARY runs BINARY from DIR (cargo runs a package's tests from its root).
  dir=.
  binary=$arg
  if [[ $arg == *=* ]]; then
    dir=${arg%%=*}
    binary=${arg#*=}
  fi
  binary=$(realpath -m "$binary")
  if [[ ! -x $binary ]]; then
    say "FAIL: $binary is not an executable"
    failed+=("$binary")
    continue
  fi
  say "$binary --test-threads=1 --nocapture (in $dir)"
  log=$(mktemp)
  if ! (cd "$dir" && "$binary" --test-threads=1 --nocapture) 2>&1 | tee "$log"; then
    failed+=("$binary")
  elif grep -q 'SKIPPED: no ' "$log"; then
    say "FAIL: $binary skipped tests: $(grep -m1 'SKIPPED: no ' "$log")"
    failed+=("$binary")
  fi
  rm -f "$log"
done
if ((${#failed[@]})); then
  say "FAIL: ${#failed[@]} of $# test binaries failed: ${failed[*]}"
  exit 1
fi
say "passed: ibv_devinfo, ib_read_bw, $# test binaries"
