#!/bin/bash
# Usage: down.sh DIR
# Stop everything net-up.sh and slurm-up.sh started under DIR and delete its namespaces.
# Safe to run twice and after a partial bring-up.
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and ip(8) live there; CI shells may lack it
dir=$(realpath -m "$1")
[ -f "$dir/netns-prefix" ] || exit 0
prefix=$(cat "$dir/netns-prefix")

stop_pidfile() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
}
for f in "$dir"/slurm/slurmd-*.pid "$dir/slurm/slurmctld.pid"; do [ -e "$f" ] && stop_pidfile "$f"; done

# Whatever still runs inside the node namespaces (job steps, trainers, torchrun agents, a
# test's own commands) was started for this cluster: end it so the namespaces can go.
for ns in $(ip netns list | awk -v p="$prefix" 'index($1, p) == 1 {print $1}'); do
  pids=$(ip netns pids "$ns")
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  ip netns del "$ns"
done
stop_pidfile "$dir/munge/munged.pid"
rm -f "$dir/netns-prefix"
exit 0
