#!/bin/bash
# Open MPI's "ssh" for the emulated nodes: mpirun --mca plm_rsh_agent tests/cluster/rsh-agent.sh
# runs its daemon on nodeI by entering that node's namespaces instead of logging in.
# Needs SHARDTUNE_CLUSTER_DIR (the DIR given to net-up.sh) in mpirun's environment.
set -euo pipefail
while [[ "$1" == -* ]]; do shift; done  # ssh options Open MPI may add (-x, -o ...)
host=$1; shift
exec "$(dirname "$(realpath "$0")")/on-node.sh" "$SHARDTUNE_CLUSTER_DIR" "${host#node}" bash -c "$*"
