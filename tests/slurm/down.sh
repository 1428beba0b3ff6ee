#!/usr/bin/env bash
# Stop the SLURM started by tests/slurm/up.sh (one node or namespaces): daemons, node namespaces, the bridge
# and the /etc/hosts lines it added. Packages, accounting data and /etc/slurm stay.
set -uo pipefail
cd "$(dirname "$0")"
source ./common.sh

scancel --state=RUNNING,PENDING --full "--user=$(id -un)" 2>/dev/null || true
stop_nodes
stop_pid slurmctld /run/slurm/slurmctld.pid
stop_pid slurmdbd /run/slurm/slurmdbd.pid
if mysqladmin ping >/dev/null 2>&1; then mysqladmin shutdown && echo "down.sh: stopped mariadb"; fi
stop_pid munged /run/munge/munged.pid
remove_network
exit 0
