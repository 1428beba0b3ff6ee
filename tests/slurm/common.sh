# Shared by up.sh, down.sh and node.sh: names, addresses and the helpers that start and stop SLURM's pieces.
# shellcheck shell=bash

HOST=$(hostname -s)
CONF=/etc/slurm
STATE=/var/spool/slurmctld
MAX_NODES=8
NODE_PREFIX=detretr-n      # node i: hostname, SLURM NodeName and network namespace detretr-n<i>
BRIDGE=detretr0            # the namespaces' veth pairs hang on this bridge (root namespace)
SUBNET=10.213.77           # private /24 on the bridge: .1 = this host (controller), .1<i> = node i
BRIDGE_ADDR=$SUBNET.1
HOSTS_MARK="# detretr-slurm-test"  # /etc/hosts lines ending in this mark are ours

node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

running() { pgrep -x "$1" >/dev/null; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "slurm: timed out waiting for $what" >&2
            tail -n 20 /var/log/slurm/*.log >&2 || true
            return 1
        fi
        sleep 1
    done
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM the daemon by its pid file, then wait for it to go
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || { echo "slurm: stopped $name"; rm -f "$pidfile"; return 0; }
        sleep 1
    done
    echo "slurm: $name (pid $pid) did not stop" >&2
}

all_nodes_up() {  # all_nodes_up N: N nodes known, every one idle, mixed or allocated
    local states
    states=$(sinfo -h -N -o '%t')
    [ "$(grep -c . <<<"$states")" -eq "$1" ] && ! grep -Evq '^(idle|mix|alloc)$' <<<"$states"
}

make_network() {  # make_network N: bridge + one namespace per node (veth pair), names in /etc/hosts
    local n=$1 i name
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    # the listings are read into variables before grep -q: under pipefail, grep -q leaving early can SIGPIPE the
    # writer and fail the test even when the line is there (then `ip addr add` fails: "Address already assigned")
    local addrs namespaces
    addrs=$(ip addr show dev "$BRIDGE")
    grep -q "inet $BRIDGE_ADDR/" <<<"$addrs" || ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$n"); do
        name=$(node_name "$i")
        namespaces=$(ip netns list)
        if ! grep -qw "$name" <<<"$namespaces"; then
            ip netns add "$name"
            ip link add "detretr-v$i" type veth peer name "detretr-p$i"
            ip link set "detretr-p$i" netns "$name"
            ip link set "detretr-v$i" master "$BRIDGE"
            ip link set "detretr-v$i" up
            ip -n "$name" addr add "$(node_addr "$i")/24" dev "detretr-p$i"
            ip -n "$name" link set "detretr-p$i" up
            ip -n "$name" link set lo up
        fi
    done
    # names resolvable from every node (the namespaces share this machine's /etc/hosts); rewritten in place
    local hosts
    hosts=$(grep -v "$HOSTS_MARK\$" /etc/hosts || true)
    for i in $(seq "$n"); do
        hosts+=$'\n'"$(node_addr "$i") $(node_name "$i") $HOSTS_MARK"
    done
    printf '%s\n' "$hosts" > /etc/hosts
}

remove_network() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NODE_PREFIX[0-9]*$"); do
        ip netns del "$ns" && echo "slurm: removed namespace $ns"
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" && echo "slurm: removed bridge $BRIDGE"
    if grep -q "$HOSTS_MARK\$" /etc/hosts; then
        local hosts
        hosts=$(grep -v "$HOSTS_MARK\$" /etc/hosts || true)
        printf '%s\n' "$hosts" > /etc/hosts
    fi
}

start_node() {  # start_node I: slurmd of node I inside its namespace, with the node's own hostname
    local name
    name=$(node_name "$1")
    mkdir -p "/var/spool/slurmd/$name"
    pid_alive "/run/slurm/slurmd-$name.pid" && return 0
    # nsenter, not `ip netns exec`: that remounts /sys, which hides the cgroup filesystem slurmd checks
    nsenter --net="/run/netns/$name" unshare --uts sh -c "hostname $name && exec /usr/sbin/slurmd -N $name"
}

kill_node() {  # kill_node I: SIGKILL every process of node I (slurmd, job steps, tasks): a node that died
    local name pids
    name=$(node_name "$1")
    pids=$(ip netns pids "$name" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    rm -f "/run/slurm/slurmd-$name.pid"
    echo "slurm: killed every process of $name: ${pids//$'\n'/ }"
}

stop_nodes() {  # stop every slurmd this script started (and any process left in a node's namespace)
    local pidfile ns pids
    for pidfile in /run/slurm/slurmd-*.pid /run/slurm/slurmd.pid; do
        [ -e "$pidfile" ] && stop_pid "slurmd ($(basename "$pidfile" .pid))" "$pidfile"
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NODE_PREFIX[0-9]*$"); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    done
    return 0
}
