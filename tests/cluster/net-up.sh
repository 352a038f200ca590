#!/bin/bash
# Usage: net-up.sh DIR [NODES]
# Emulate NODES machines on one host: one network namespace per node, named node0..nodeN-1,
# joined by a bridge that lives in its own namespace, so nothing touches the host's network.
# Every node gets 10.213.0.(i+1) and a private /etc/hosts naming all nodes; on-node.sh enters
# a node (its netns plus its own hostname and /etc/hosts). State and logs stay under DIR;
# down.sh DIR removes everything.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and ip(8) live there; CI shells may lack it
dir=$(realpath -m "$1"); nodes=${2:-2}
subnet=10.213.0
mkdir -p "$dir"
# Namespace names are global to the host: a per-cluster prefix lets two clusters coexist.
prefix=st$(printf '%04x' $((RANDOM % 65536)))$$
echo "$prefix" > "$dir/netns-prefix"

ip netns add "${prefix}sw"
ip -n "${prefix}sw" link add br0 type bridge
ip -n "${prefix}sw" link set br0 up

hosts="127.0.0.1 localhost"
for i in $(seq 0 $((nodes - 1))); do hosts+=$'\n'"$subnet.$((i + 1)) node$i"; done
for i in $(seq 0 $((nodes - 1))); do
  ns=${prefix}n$i
  ip netns add "$ns"
  ip link add eth0 netns "$ns" type veth peer name port$i netns "${prefix}sw"
  ip -n "${prefix}sw" link set port$i master br0 up
  ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  mkdir -p "$dir/node$i"
  echo "$hosts" > "$dir/node$i/hosts"
done
echo "$nodes" > "$dir/nodes"
