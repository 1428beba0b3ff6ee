#!/usr/bin/env bash
# Fail or restart one node of the namespace cluster (tests/slurm/up.sh --nodes N):
#   bash tests/slurm/node.sh kill I    SIGKILL every process on node I (slurmd, job steps, tasks)
#   bash tests/slurm/node.sh start I   start node I's slurmd again (it returns to service when it registers)
set -euo pipefail
cd "$(dirname "$0")"
source ./common.sh

case ${1:-} in
    kill) kill_node "${2:?node number}" ;;
    start) start_node "${2:?node number}" ;;
    *) echo "usage: $0 kill|start I" >&2; exit 2 ;;
esac
