#!/bin/bash
# swcount.sh: context switches, wake-ups, system calls and epoll waits per
# connection of one proxy under proxybench load, counted with perf stat on
# the proxy's worker processes from the 4th to the 8th second of a 10 s run.
#
# usage: bench/scripts/swcount.sh TARGET SNIPROXY_BIN MODE CLIENTS WORKERS
#   TARGET  sniproxy | nginx | haproxy | dlundquist
#   MODE    rate | tls | http
# needs: perf (Debian: linux-perf), root or kernel.perf_event_paranoid <= 0,
# and proxybench built first: go build -o /tmp/pb ./bench/proxybench
# (PB=path overrides /tmp/pb). Figures are per connection, from the
# conn/s of the run (so they include the seconds perf did not count only
# as far as the rate was steady).
set -euo pipefail
if [ $# -ne 5 ]; then
	sed -n '2,12p' "$0" >&2
	exit 2
fi
t=$1 bin=$2 mode=$3 clients=$4 workers=$5
pb=${PB:-/tmp/pb}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$pb" -mode "$mode" -workers "$workers" -clients "$clients" -targets "$t" \
	-sniproxy "$bin" -runs 1 -duration 10s >"$out/pb.out" 2>&1 &
pbpid=$!
sleep 4
case $t in
sniproxy) pids=$(pgrep -d, -f 'sniproxy.*worker') ;;
nginx) pids=$(pgrep -d, -f 'nginx: worker') ;;
dlundquist) pids=$(pgrep -d, -x sniproxy) ;;
haproxy) pids=$(pgrep -d, -x haproxy) ;;
*) echo "unknown target $t" >&2; kill "$pbpid"; exit 2 ;;
esac
perf stat -x, -e sched:sched_switch,sched:sched_wakeup,raw_syscalls:sys_enter,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_wait,task-clock \
	-p "$pids" -o "$out/perf.stat" -- sleep 4
wait "$pbpid"
line=$(grep "^$mode run" "$out/pb.out")
rate=$(echo "$line" | awk '{for (i = 1; i <= NF; i++) if ($i == "conn/s") { print $(i-1); exit }}')
awk -F, -v r="$rate" -v t="$t" '$3 != "" {
	n = $3; sub(/.*:/, "", n)
	if (n == "task-clock") printf "%s CPU %.1f µs/conn\n", t, $1*1000/(4*r)
	else printf "%s %s %.2f/conn\n", t, n, $1/(4*r)
}' "$out/perf.stat"
echo "$line"
