#!/usr/bin/env bash
# Stop the single-node SLURM started by tests/slurm/up.sh (daemons only; packages and state stay).
set -uo pipefail

stop() {  # stop NAME PIDFILE: SIGTERM the daemon by its pid file, then wait for it to go
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || { echo "down.sh: stopped $name"; return 0; }; sleep 1; done
    echo "down.sh: $name (pid $pid) did not stop" >&2
}

scancel --state=RUNNING,PENDING --full "--user=$(id -un)" 2>/dev/null || true
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop slurmdbd /run/slurm/slurmdbd.pid
if mysqladmin ping >/dev/null 2>&1; then mysqladmin shutdown && echo "down.sh: stopped mariadb"; fi
stop munged /run/munge/munged.pid
exit 0
