#!/bin/bash
# Usage: slurm-up.sh DIR
# Start a real SLURM on the nodes made by net-up.sh: a private munged (own key and socket, so
# a system munged is neither needed nor disturbed), slurmctld on node0 and one slurmd per node.
# Clients then run on a node with SLURM_CONF=DIR/slurm/slurm.conf, e.g.
#   SLURM_CONF=DIR/slurm/slurm.conf on-node.sh DIR 0 sinfo
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and ip(8) live there; CI shells may lack it
dir=$(realpath -m "$1")
here=$(dirname "$(realpath "$0")")
nodes=$(cat "$dir/nodes")
subnet=10.213.0
munge=$dir/munge slurm=$dir/slurm
mkdir -p "$munge" "$slurm"/{state,spool,log}

# munged refuses keys and sockets in directories that others could write: give it its own.
chown munge:munge "$munge"; chmod 0755 "$munge"
su -s /bin/sh munge -c "dd if=/dev/urandom of='$munge/munge.key' bs=1024 count=1 status=none && chmod 0400 '$munge/munge.key'"
su -s /bin/sh munge -c "/usr/sbin/munged --socket='$munge/socket' --key-file='$munge/munge.key' \
  --pid-file='$munge/munged.pid' --log-file='$munge/munged.log' --seed-file='$munge/munged.seed'"

node_lines=""
for i in $(seq 0 $((nodes - 1))); do
  node_lines+="NodeName=node$i NodeAddr=$subnet.$((i + 1)) CPUs=$(nproc) RealMemory=2000"$'\n'
done
cat > "$slurm/slurm.conf" <<CONF
ClusterName=shardtune-test
SlurmctldHost=node0($subnet.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~12 s instead of the default ~121 s.
AuthInfo=socket=$munge/socket,cred_expire=10
MpiDefault=none
# No cgroups: the node namespaces share the host's cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=sched_interval=2
KillWait=10
StateSaveLocation=$slurm/state
SlurmdSpoolDir=$slurm/spool/%n
SlurmctldPidFile=$slurm/slurmctld.pid
SlurmdPidFile=$slurm/slurmd-%n.pid
SlurmctldLogFile=$slurm/log/slurmctld.log
SlurmdLogFile=$slurm/log/slurmd-%n.log
$node_lines
PartitionName=debug Nodes=node[0-$((nodes - 1))] Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$slurm/slurm.conf
"$here/on-node.sh" "$dir" 0 slurmctld
for i in $(seq 0 $((nodes - 1))); do "$here/on-node.sh" "$dir" "$i" slurmd; done
for _ in $(seq 120); do
  state=$("$here/on-node.sh" "$dir" 0 sinfo -h -o %t 2>/dev/null | sort -u)
  [ "$state" = idle ] && exit 0
  sleep 0.25
done
echo "SLURM did not come up (node state: ${state:-none}); logs in $slurm/log" >&2
exit 1
