#!/usr/bin/env bash
# Debian's Slurm (slurm-wlm) and munge for tests/test_slurm.py, which starts its own private
# one-node cluster. Idempotent and quiet; needs root. A policy-rc.d that answers 101 keeps the
# packages from starting their system services at install time (the tests start their own).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "install-slurm: needs root (apt-get); tests/test_slurm.py will skip" >&2
    exit 0
fi
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
    apt-get update -qq
fi
apt-get install -y -qq slurm-wlm munge >/dev/null
