#!/usr/bin/env bash
# Start a real SLURM (with slurmdbd accounting) on this machine for the tests marked `slurm`.
#   bash tests/slurm/up.sh             one node: slurmd on this host, as a single-machine cluster
#   bash tests/slurm/up.sh --nodes 2   N nodes: each slurmd in its own network + UTS namespace (own hostname,
#                                      own address on a private bridge), slurmctld/slurmdbd/munge on this host
# Idempotent; switching between the two layouts restarts the daemons. Run as root. Settings that work in these
# VMs: proctrack/linuxproc, task/none, cons_tres + CR_Core. Accounting matters: without slurmdbd, `sacct`
# (which submitit polls for job states) knows no job. The nodes share this machine's filesystem (and its CPUs),
# which is the shared-filesystem case of a real cluster; test traffic stays on the bridge's private subnet.
set -euo pipefail
cd "$(dirname "$0")"
source ./common.sh

NODES=1
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) echo "usage: $0 [--nodes N]   (N = 1: this host; N = 2..$MAX_NODES: network namespaces)" >&2; exit 2 ;;
    esac
done
if ! [[ $NODES =~ ^[0-9]+$ ]] || [ "$NODES" -lt 1 ] || [ "$NODES" -gt "$MAX_NODES" ]; then
    echo "up.sh: --nodes $NODES must be 1..$MAX_NODES" >&2
    exit 2
fi

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ "$status" == *"install ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "up.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$CONF" "$STATE" /var/spool/slurmd /var/log/slurm /run/slurm /run/munge /run/mysqld
chown slurm:slurm "$STATE" /var/log/slurm /run/slurm
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# A running cluster of the other layout is stopped first (its nodes and controller), accounting stays.
if [ -s "$CONF/slurm.conf" ] && ! grep -q "^# layout: nodes=$NODES\$" "$CONF/slurm.conf"; then
    echo "up.sh: switching the cluster to $NODES node(s)"
    scancel --state=RUNNING,PENDING --full "--user=$(id -un)" 2>/dev/null || true
    stop_nodes
    stop_pid slurmctld /run/slurm/slurmctld.pid
fi

# The node hardware as slurmd itself detects this host (CPU count, sockets/cores/threads, memory); every
# namespace node reports the same hardware (they share it).
HW=$(slurmd -C | sed -n '1s/^NodeName=[^ ]* //p')  # sed reads all of it: no SIGPIPE under pipefail
if [ "$NODES" -eq 1 ]; then
    CTL="$HOST"
    NODE_LINES="NodeName=$HOST $HW State=UNKNOWN"
    PART_NODES=$HOST
else
    CTL="$HOST($BRIDGE_ADDR)"  # the nodes reach the controller on the bridge
    NODE_LINES=""
    for i in $(seq "$NODES"); do
        NODE_LINES+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") $HW State=UNKNOWN"$'\n'
    done
    PART_NODES="$NODE_PREFIX[1-$NODES]"
fi
cat > "$CONF/slurm.conf.new" <<CONF
# Written by tests/slurm/up.sh for host $HOST
# layout: nodes=$NODES
ClusterName=detretr
SlurmctldHost=$CTL
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
# a node that stops answering is declared DOWN (and its jobs NODE_FAIL) after this many seconds
SlurmdTimeout=20
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
$NODE_LINES
PartitionName=debug Nodes=$PART_NODES Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF/slurm.conf.new" "$CONF/slurm.conf"

cat > "$CONF/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbd
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm "$CONF/slurmdbd.conf"
chmod 600 "$CONF/slurmdbd.conf"

[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
running munged || runuser -u munge -- /usr/sbin/munged
wait_for 20 munge munge -n

if ! running mariadbd; then
    (mysqld_safe --user=mysql >/var/log/slurm/mariadb.log 2>&1 &)
fi
wait_for 60 mariadb mysqladmin ping
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbd';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

running slurmdbd || /usr/sbin/slurmdbd
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i -Q add cluster detretr >/dev/null 2>&1 || true

if [ "$NODES" -gt 1 ]; then
    make_network "$NODES"
fi
pid_alive /run/slurm/slurmctld.pid || /usr/sbin/slurmctld
wait_for 60 slurmctld scontrol ping
if [ "$NODES" -eq 1 ]; then
    mkdir -p "/var/spool/slurmd/$HOST"
    pid_alive "/run/slurm/slurmd-$HOST.pid" || /usr/sbin/slurmd
    NAMES=$HOST
else
    for i in $(seq "$NODES"); do
        start_node "$i"
    done
    NAMES="$NODE_PREFIX[1-$NODES]"
fi
scontrol update NodeName="$NAMES" State=RESUME >/dev/null 2>&1 || true
wait_for 90 "node(s) $NAMES idle" all_nodes_up "$NODES"
sinfo
