"""Build the chart's image (the repository's Dockerfile) with Debian's podman, no registry needed.

    python -m tests.lab.image          # make image: prints the image's name when it is built

The Dockerfile's default base (python:3.11-slim) would come from a registry, and none is
reachable here: the base is a minimal Debian 12 root made by ``mmdebstrap`` from the same
Debian archive ``apt-get`` uses (cached as a tarball under ``LAB_PREFIX/image``), imported with
``podman import`` and passed as the ``BASE`` build argument. pip inside the build gets this
machine's CA bundle as the build secret ``pip_ca`` (a TLS-intercepting proxy's certificate is in
it); the image does not keep it.

podman runs with ``LAB_PREFIX/image/containers.conf`` (``CONTAINERS_CONF``): runc, because
crun refuses this machine's hybrid cgroup v1/v2 layout; cgroupfs, because no systemd runs; and
limits on open files and processes that an unprivileged-resource container may set here (the
defaults are refused). See ../shared/notes (containers) for how these were found.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import lab

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = lab.LAB_PREFIX / "image"
BASE_IMAGE = "localhost/hub-spawner-base:bookworm"
IMAGE = "localhost/hub-spawner:test"
BASE_PACKAGES = "python3,python3-venv,python3-pip,openssh-client,tini,ca-certificates"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def containers_conf() -> str:
    """podman's settings for this machine kind: no systemd (cgroupfs), a hybrid cgroup v1/v2
    layout that crun refuses (runc), and open-file and process limits no higher than this
    process's own hard limits (podman's defaults are refused here; processes above 32768
    were refused too)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 20000 if nofile == resource.RLIM_INFINITY else min(nofile, 1 << 20)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    return ("# Written by tests/lab/image.py (see its docstring).\n"
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n')


def podman_env() -> dict[str, str]:
    """The environment every podman command of the tests runs with."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    conf, text = IMAGE_DIR / "containers.conf", containers_conf()
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return dict(os.environ, CONTAINERS_CONF=str(conf))


def podman(*args: str, timeout: float = 600, check: bool = True
           ) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=podman_env(), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def base_image() -> str:
    """The Debian 12 base, imported once (its tarball is kept for the next import)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    tarball = IMAGE_DIR / f"debian-bookworm-{BASE_PACKAGES.count(',') + 1}pkgs.tar"
    if not tarball.exists():
        sources = [str(path) for path in [Path("/etc/apt/sources.list"),
                                          *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
                   if path.is_file() and path.stat().st_size
                   and path.suffix in (".list", ".sources", "")]
        aptopts = [f"--aptopt={path}" for path in sorted(Path("/etc/apt/apt.conf.d").glob("*"))
                   if path.is_file()]
        partial = tarball.with_suffix(".part.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", *aptopts,
             "--dpkgopt=path-exclude=/usr/share/man/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             "bookworm", str(partial), *sources],
            check=True, capture_output=True, text=True, timeout=900,
        )
        partial.rename(tarball)
    podman("import", str(tarball), BASE_IMAGE)
    return BASE_IMAGE


def build(tag: str = IMAGE) -> str:
    """Build the repository's Dockerfile on the Debian base; returns the image's name."""
    secret = ["--secret", f"id=pip_ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    podman("build", "--network=host", "--build-arg", f"BASE={base_image()}", *secret,
           "-f", str(REPO / "Dockerfile"), "-t", tag, str(REPO), timeout=1800)
    return tag


def main() -> int:
    started = time.monotonic()
    tag = build()
    size = podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"image: {tag} ({int(size) >> 20} MiB) built in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
