#!/usr/bin/env bash
# make fresh-check: README's two commands, as root, in a really fresh Debian 12 root.
#
# The root is a minimal Debian 12 (mmdebstrap --variant=minbase, plus git and make, with which a
# newcomer clones and starts), built once from the same Debian archive apt-get uses here and
# cached as a pristine tarball ($FRESH_CACHE), unpacked anew for each run. Inside it: a clean
# clone of HEAD (committed work only), its own /proc, /sys, /dev, a new tmpfs /run and /tmp, the
# host's network stack (the lab makes its own namespaces), and this machine's package-registry
# settings (apt, pip and npm configuration, CA certificates, the local wheel and index
# directories pip is pointed at, bind-mounted read-only), /etc/hosts and /etc/resolv.conf.
# There, `make test` runs as the very first command, then `make demo` is driven by
# tests/lab/demo_walkthrough.py (bob logs in, starts from the form, sees JupyterLab, stops,
# Ctrl-C, nothing left running). Both results are printed; the exit status is non-zero when
# either failed. PYTEST_ARGS, when set, narrows `make test` to those pytest arguments (for
# trying the check itself; a real fresh-check runs the whole suite).
#
# Refuses to run while another lab is up on this machine (same namespace and device names).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
FRESH_CACHE=${FRESH_CACHE:-/var/cache/hub-spawner-fresh}
FRESH_WORK=${FRESH_WORK:-/var/tmp}
SUITE=bookworm
INCLUDE=ca-certificates,git,make
TARBALL=$FRESH_CACHE/debian-$SUITE-minbase-$(echo "$INCLUDE" | md5sum | cut -c1-8).tar
CLONE=/root/hub_spawner  # where the clean clone lives inside the root
PATH_IN_ROOT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "fresh_check: $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "fresh_check: run as root (it builds a root, mounts and runs the lab)" >&2
    exit 1
fi

lab_is_up() {
    ip -o link show 2>/dev/null | grep -q 'hsl-' && return 0
    ip route show table all 2>/dev/null | grep -q '10\.77\.' && return 0
    ip netns list 2>/dev/null | grep -q 'hsl-' && return 0
    return 1
}

# --- inside: a private mount namespace, the root prepared; mount, chroot, run both commands ---
if [ "${1:-}" = --inside ]; then
    root=$2
    mount --bind "$root" "$root"  # `ip netns` needs / to be a mount point ("mount --make-rslave /")
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
    mount -t tmpfs -o mode=755 tmpfs "$root/dev"
    for node in null zero full random urandom tty; do
        touch "$root/dev/$node"
        mount --bind "/dev/$node" "$root/dev/$node"
    done
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    mount -t tmpfs -o mode=755 tmpfs "$root/run"
    install -d -m 1777 "$root/run/lock"  # made at boot by the OS, not by packages
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    while read -r directory; do
        mkdir -p "$root$directory"
        mount --bind "$directory" "$root$directory"
        mount -o remount,bind,ro "$root$directory"
    done < "$root/.registry-directories"
    in_root() {
        env -i PATH=$PATH_IN_ROOT HOME=/root LANG=C.UTF-8 TERM=dumb $(env | grep '^PIP_' || true) \
            chroot "$root" /bin/bash -c "cd $CLONE && $1"
    }
    test_status=0 demo_status=0
    say "make test (the first command in the fresh root)"
    started=$SECONDS
    in_root "make test PYTEST_ARGS=$(printf '%q' "${PYTEST_ARGS:-}")" || test_status=$?
    test_seconds=$((SECONDS - started))
    say "make demo, driven by tests/lab/demo_walkthrough.py"
    started=$SECONDS
    if [ -x "$root/opt/hub-spawner-lab/venv/bin/python" ]; then
        in_root "/opt/hub-spawner-lab/venv/bin/python -m tests.lab.demo_walkthrough" \
            || demo_status=$?
    else
        say "no lab venv in the root (make test's install step failed): make demo not driven"
        demo_status=1
    fi
    demo_seconds=$((SECONDS - started))
    result() { [ "$1" = 0 ] && echo "passed" || echo "FAILED (exit status $1)"; }
    say "result: make test $(result $test_status) in ${test_seconds} s"
    say "result: make demo $(result $demo_status) in ${demo_seconds} s"
    [ "$test_status" = 0 ] && [ "$demo_status" = 0 ]
    exit $?
fi

# --- outside: build or reuse the pristine root, unpack it, copy settings and a clean clone ---
if lab_is_up; then
    echo "fresh_check: a lab is up on this machine (hsl-* devices or namespaces, or a 10.77.0.0/16" \
         "route): the fresh root's lab would use the same names. Stop it first" \
         "(python -m tests.lab.lab down, or Ctrl-C in make demo)." >&2
    exit 1
fi
# The fresh root shares this machine's network stack: a hub or proxy left running here (an
# interrupted make test) holds the ports the suite's hubs use, and their tests fail for it.
if pgrep -f 'configurable-http-proxy|bin/jupyterhub ' >/dev/null; then
    echo "fresh_check: a JupyterHub or configurable-http-proxy runs on this machine" \
         "($(pgrep -f 'configurable-http-proxy|bin/jupyterhub ' | tr '\n' ' ')): the fresh" \
         "root's hubs need their ports. Stop them first." >&2
    exit 1
fi
started_all=$SECONDS

if [ ! -f "$TARBALL" ]; then
    if ! command -v mmdebstrap >/dev/null; then
        say "apt-get install mmdebstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap
    fi
    mkdir -p "$FRESH_CACHE"
    sources=()
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] && [ -s "$file" ] && sources+=("$file")
    done
    aptopts=()
    for file in /etc/apt/apt.conf.d/*; do
        [ -f "$file" ] && aptopts+=("--aptopt=$file")
    done
    say "building the pristine root: mmdebstrap --variant=minbase --include=$INCLUDE $SUITE"
    mmdebstrap --variant=minbase --include="$INCLUDE" "${aptopts[@]}" "$SUITE" \
        "${TARBALL%.tar}.part.tar" "${sources[@]}"
    mv "${TARBALL%.tar}.part.tar" "$TARBALL"
fi

root=$(mktemp -d "$FRESH_WORK/hub-spawner-fresh.XXXXXX")
cleanup() {
    # Whatever still runs in the root was started by this check: stop it, by PID, then remove it.
    local root_id pid
    root_id=$(stat -c '%d:%i' "$root" 2>/dev/null) || return 0
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [ "$(stat -L -c '%d:%i' "/proc/$pid/root" 2>/dev/null)" = "$root_id" ] || continue
        say "stopping a process left in the root: $pid $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
        kill -KILL "$pid" 2>/dev/null || true
    done
    # The lab's devices and route, if its teardown failed (none existed before: see lab_is_up).
    for device in $(ip -o link show 2>/dev/null | grep -o 'hsl-[a-z0-9]*' | sort -u); do
        ip link del "$device" 2>/dev/null || true
    done
    ip route del unreachable 10.77.0.0/16 2>/dev/null || true
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT
say "unpacking $TARBALL into $root"
tar -C "$root" --numeric-owner -xpf "$TARBALL"

# This machine's package-registry settings, as a new machine of its kind has them.
copy_in() {  # copy_in PATH...: each existing file or directory to the same place in the root
    local path
    for path in "$@"; do
        [ -e "$path" ] || continue
        mkdir -p "$root$(dirname "$path")"
        cp -a "$path" "$root$(dirname "$path")/"
    done
}
copy_in /etc/apt/apt.conf.d /etc/pip.conf /etc/xdg/pip /root/.config/pip /root/.pip /etc/npmrc \
    /root/.npmrc /usr/local/share/ca-certificates /etc/ssl/certs/ca-certificates.crt \
    /etc/hosts /etc/resolv.conf
rm -f "$root/etc/apt/sources.list"
copy_in /etc/apt/sources.list /etc/apt/sources.list.d
# Local directories named by pip's settings (find-links, file:// indexes, constraints), read-only.
{
    env | grep '^PIP_' | cut -d= -f2- || true
    cat /etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf /root/.pip/pip.conf \
        2>/dev/null | grep -E '^[[:space:]]*[a-z-]+[[:space:]]*=' | cut -d= -f2- || true
} | tr ' ,' '\n\n' | sed -e 's|^file://||' -e 's|/simple/*$||' | grep '^/' | sort -u |
while read -r path; do  # an index's .../simple links to files beside it: mount its parent
    if [ -d "$path" ] && [ ! -e "$root$path" ]; then echo "$path"; fi
done > "$root/.registry-directories"

head=$(git -C "$REPO" rev-parse HEAD)
say "a clean clone of HEAD ($(git -C "$REPO" log -1 --format='%h %s' | cut -c1-80))"
git clone -q --no-hardlinks "$REPO" "$root$CLONE"
git -C "$root$CLONE" checkout -q --detach "$head"
if [ -n "$(git -C "$REPO" status --porcelain)" ]; then
    say "note: uncommitted changes in $REPO are not in the clone"
fi
say "root ready in $((SECONDS - started_all)) s"

status=0
unshare --mount --propagation private "$0" --inside "$root" || status=$?
if lab_is_up; then
    say "FAILED: the lab's devices or routes were left behind:"
    ip -o link show | grep 'hsl-' || true
    ip route show table all | grep '10\.77\.' || true
    status=1
fi
say "done in $((SECONDS - started_all)) s, exit status $status"
exit $status
