#!/usr/bin/env bash
# `make test` as on a machine that has just booted: a brand-new, empty /run (a private tmpfs in
# a private mount namespace, so nothing outside is touched), and after the install step the lab
# packages' runtime state (munge's seed and log directories) empty too. Network namespaces made
# in here live under the private /run/netns. Run it before any change that touches the lab or
# the installer: a used machine's leftovers cannot hide a missing step here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "fresh_check.sh: run as root" >&2
    exit 1
fi
if [ -z "${HUB_SPAWNER_FRESH_RUN:-}" ]; then
    exec env HUB_SPAWNER_FRESH_RUN=1 unshare --mount --propagation private "$0" "$@"
fi
mount -t tmpfs -o mode=755 tmpfs /run
install -d -m 1777 /run/lock  # made at boot by the OS (systemd-tmpfiles), not by packages
echo "fresh_check.sh: /run is empty: $(ls -A /run | tr '\n' ' ')"
LAB_PREFIX=${LAB_PREFIX:-/opt/hub-spawner-lab}
LAB_PREFIX=$LAB_PREFIX tests/lab/install.sh
for state in /var/lib/munge /var/log/munge; do
    if [ -d "$state" ]; then
        mount -t tmpfs -o mode=755 tmpfs "$state"  # root-owned and empty, as if never created
    fi
done
LAB_PREFIX=$LAB_PREFIX exec tests/run.sh "$@"
