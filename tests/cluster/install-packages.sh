#!/bin/bash
# Install what the cluster tests drive: SLURM + munge (Debian 12 ships SLURM 22.05) and Open MPI.
# Idempotent and quiet; only the apt output of a failure is shown.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and ip(8) live there; CI shells may lack it
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v nsenter >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v pkill >/dev/null || need+=(procps)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages (${need[*]}) and not root: cannot install" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
  tail -20 "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
