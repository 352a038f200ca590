#!/bin/bash
# Usage: on-node.sh DIR I COMMAND [ARGS...]
# Run COMMAND "on node I" of a cluster made by net-up.sh: inside its network namespace, with
# hostname nodeI and that node's /etc/hosts. nsenter + unshare rather than `ip netns exec`:
# the latter remounts /sys, which breaks slurmd's hardware and cgroup detection.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and ip(8) live there; CI shells may lack it
dir=$(realpath -m "$1"); node=$2; shift 2
prefix=$(cat "$dir/netns-prefix")
exec nsenter --net="/run/netns/${prefix}n$node" unshare --mount --uts --propagation private \
  bash -c 'mount --bind "$1/node$2/hosts" /etc/hosts && hostname "node$2" && shift 2 && exec "$@"' \
  on-node "$dir" "$node" "$@"
