#!/usr/bin/env bash
# Start a real single-node SLURM (with slurmdbd accounting) on this machine for the tests marked `slurm`.
# Idempotent; run as root. Settings that work in these VMs: proctrack/linuxproc, task/none, cons_tres + CR_Core.
# Accounting matters: without slurmdbd, `sacct` (which submitit polls for job states) knows no job.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "up.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

HOST=$(hostname -s)
CONF=/etc/slurm
STATE=/var/spool/slurmctld
mkdir -p "$CONF" "$STATE" /var/spool/slurmd /var/log/slurm /run/slurm /run/munge /run/mysqld
chown slurm:slurm "$STATE" /var/log/slurm /run/slurm
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# The node line as slurmd itself detects this host (real CPU count, sockets/cores/threads, memory).
NODE_LINE=$(slurmd -C | head -n 1)
cat > "$CONF/slurm.conf" <<CONF
# Written by tests/slurm/up.sh for host $HOST
ClusterName=detretr
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

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

running() { pgrep -x "$1" >/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "up.sh: timed out waiting for $what" >&2
            tail -n 20 /var/log/slurm/*.log >&2 || true
            return 1
        fi
        sleep 1
    done
}

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

running slurmctld || /usr/sbin/slurmctld
wait_for 60 slurmctld scontrol ping
running slurmd || /usr/sbin/slurmd
scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
wait_for 90 "node $HOST idle" bash -c "sinfo -h -n $HOST -o %t | grep -Eq '^(idle|mix|alloc)'"
sinfo
