#!/bin/bash
# Runs one coupon-demo sale on a throwaway redis-server (appendonly yes, appendfsync always) and
# prints Redis's own command counters per record (Docs/Redis.md, Docs/Performance.md).
# Needs redis-server, redis-cli and python3 (for a free port).
# usage: scripts/redis-commandstats.sh COUPON_DEMO_BINARY REQUESTS LABEL
BIN=$1; N=$2; LABEL=$3
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
D=$(mktemp -d /tmp/eo-commandstats.XXXX)
redis-server --port $PORT --bind 127.0.0.1 --dir $D --appendonly yes --appendfsync always --save '' --daemonize yes --pidfile $D/pid --logfile $D/log
sleep 0.5
redis-cli -p $PORT CONFIG RESETSTAT >/dev/null
START=$(date +%s.%N)
$BIN --store redis --transport redis-streams --redis-url redis://127.0.0.1:$PORT --requests $N --json > $D/out.json 2> $D/err.txt
RC=$?
END=$(date +%s.%N)
redis-cli -p $PORT INFO commandstats > $D/cmdstats.txt
redis-cli -p $PORT INFO stats | grep total_commands_processed > $D/total.txt
redis-cli -p $PORT INFO cpu > $D/cpu.txt
kill $(cat $D/pid)
echo "$LABEL rc=$RC requests=$N elapsed=$(awk -v a=$START -v b=$END 'BEGIN{print b-a}')"
tail -c 600 $D/out.json; echo
grep -o 'cmdstat_[a-z|]*:calls=[0-9]*' $D/cmdstats.txt | sed 's/cmdstat_//' | awk -F'[:=]' -v n=$N '{printf "%s %d (%.3f/record)\n",$1,$3,$3/n}'
cat $D/total.txt
