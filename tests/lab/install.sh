#!/usr/bin/env bash
# Install everything the demo lab and the test suite need, on a fresh Debian 12 machine (as root).
# Idempotent: a second run only checks. Everything lands under $LAB_PREFIX (default
# /opt/hub-spawner-lab) or in Debian's own places.
set -euo pipefail

LAB_PREFIX=${LAB_PREFIX:-/opt/hub-spawner-lab}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$LAB_PREFIX/venv
STAMP=$LAB_PREFIX/.installed

# Everything the lab, the demo and the tests run, from Debian's packages: a fresh Debian 12 has
# none of it (tests/fresh_check.sh proves that on a minimal root). Grid Engine's packages conflict
# with slurm-wlm-torque, so the Torque/PBS wrappers are unpacked from that package below instead
# of installed; they need Slurm's Perl bindings.
APT_PACKAGES=(openssh-server openssh-client munge slurm-wlm python3-venv iproute2 util-linux chromium
              procps passwd gridengine-master gridengine-exec gridengine-client libslurm-perl
              libslurmdb-perl libswitch-perl
              systemd  # systemd-analyze verify on example_hub_config/systemd/ (the units' test)
              podman buildah runc mmdebstrap)  # the chart's image (tests/lab/image.py)
# configurable-http-proxy runs on Node.js: Debian's nodejs and npm, unless a Node.js at least as
# new as Debian's (18) and its npm are already there (this machine kind's image carries 20).
NODE_MIN_MAJOR=18
TORQUE_WRAPPERS=$LAB_PREFIX/torque-wrappers
LOG_DIR=$LAB_PREFIX/install-logs

# run_logged NAME COMMAND...: run quietly; on failure show the command's own output and stop.
run_logged() {
    local name=$1 log
    shift
    mkdir -p "$LOG_DIR"
    log=$LOG_DIR/$name.log
    if ! "$@" > "$log" 2>&1; then
        echo "install.sh: '$*' failed; its output (also in $log):" >&2
        grep -v "^WARNING: Location" "$log" | tail -n 60 >&2
        exit 1
    fi
}

node_is_usable() {
    local version
    command -v node >/dev/null && command -v npm >/dev/null || return 1
    version=$(node --version 2>/dev/null) || return 1
    version=${version#v}
    [ "${version%%.*}" -ge "$NODE_MIN_MAJOR" ] 2>/dev/null
}

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (the lab creates network namespaces and users)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! node_is_usable; then
    missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    # Package post-install scripts must not start daemons: the lab starts its own, in namespaces.
    created_policy=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=yes
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Grid Engine's postinst asks where the cluster is: the lab's login host, cell "default".
    for pkg in gridengine-common gridengine-master gridengine-exec gridengine-client; do
        printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string login\n' \
            "$pkg" "$pkg" "$pkg"
    done | debconf-set-selections
    run_logged apt-update apt-get update
    status=0
    (run_logged apt-install apt-get install -y --no-install-recommends "${missing[@]}") || status=$?
    [ "$created_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
    [ "$status" = 0 ] || exit "$status"
fi
node_is_usable || { echo "install.sh: no usable node and npm after installing them" >&2; exit 1; }

mkdir -p "$LAB_PREFIX"
chmod 755 "$LAB_PREFIX"

# Torque/PBS command syntax: Slurm's own qsub/qstat/qdel wrappers, beside links to the Slurm
# commands they call. The lab's second sshd puts this directory first on PATH.
if [ ! -x "$TORQUE_WRAPPERS/qsub" ]; then
    work=$(mktemp -d)
    if ! (cd "$work" && apt-get download -q slurm-wlm-torque >/dev/null 2>&1); then
        run_logged apt-update apt-get update
        (cd "$work" && run_logged apt-download apt-get download slurm-wlm-torque)
    fi
    (cd "$work" && run_logged dpkg-deb dpkg-deb -x slurm-wlm-torque_*.deb root)
    mkdir -p "$TORQUE_WRAPPERS"
    for command in qsub qstat qdel qhold qrls pbsnodes; do
        install -m 755 "$work/root/usr/bin/$command" "$TORQUE_WRAPPERS/$command"
    done
    for command in sbatch squeue scancel scontrol salloc srun sinfo; do
        ln -sf "/usr/bin/$command" "$TORQUE_WRAPPERS/$command"
    done
    rm -rf "$work"
fi

# One world-readable venv from Debian's Python: the hub side and the jobs (which run as lab users,
# who cannot read /root) use it. The hub side also gets this package, editable.
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
fi
# The stamp records which checkout the editable install points at.
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REPO" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ] \
        || [ "$REPO/tests/lab/requirements.txt" -nt "$STAMP" ]; then
    run_logged pip-upgrade "$VENV/bin/pip" install -q --upgrade pip
    run_logged pip-requirements "$VENV/bin/pip" install -q -r "$REPO/tests/lab/requirements.txt"
    run_logged pip-editable "$VENV/bin/pip" install -q --no-deps -e "$REPO"
    echo "$REPO" > "$STAMP"
fi
chmod -R a+rX "$VENV"

if [ ! -x "$LAB_PREFIX/node_modules/.bin/configurable-http-proxy" ]; then
    run_logged npm npm install --no-audit --no-fund --prefix "$LAB_PREFIX" configurable-http-proxy@5.3.0
fi

echo "install.sh: ready ($VENV, $LAB_PREFIX/node_modules/.bin/configurable-http-proxy)"
