"""SSH user certificates from one CA key, instead of a long-lived key file per user.

For each new SSH connection the spawner mints an ephemeral key pair and a certificate for it,
signed by the CA key the login nodes trust (sshd's ``TrustedUserCAKeys``): principal = the
cluster user name, a validity of minutes, the key id naming the hub user (sshd logs it). The
only long-lived secret on the hub is the CA key; a leaked ephemeral key is worthless minutes
later. asyncssh signs and presents the certificate itself; the tunnel service's OpenSSH gets
the pair as files (``<key>`` and ``<key>-cert.pub``).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from .errors import ClusterUnreachable
from .sshlib import asyncssh

#: Certificates start this long before "now", for clocks a little behind the hub's.
CLOCK_SKEW_SECONDS = 60


@dataclass(frozen=True)
class Certified:
    """An ephemeral key and the certificate that lets it log in."""

    key: asyncssh.SSHKey
    certificate: asyncssh.SSHCertificate
    valid_before: float

    def private_key_text(self) -> str:
        return self.key.export_private_key().decode()

    def certificate_text(self) -> str:
        return self.certificate.export_certificate().decode()


def read_private_key_file(path: str, what: str = "SSH key") -> asyncssh.SSHKey:
    """A private key file, refused (as OpenSSH does) when group or others can read it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ClusterUnreachable(f"The {what} {path} does not exist.") from None
    except OSError as error:
        raise ClusterUnreachable(f"The {what} {path} cannot be read: {error.strerror}.") from None
    if mode & 0o077:
        raise ClusterUnreachable(
            f"The {what} {path} is readable by group or others (mode {mode:04o}); refusing to "
            f"use it. Run: chmod 600 {path}"
        )
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as error:
        raise ClusterUnreachable(f"The {what} {path} cannot be used: {error}.") from None


def import_identity(key_text: str, certificate_text: str = "") -> asyncssh.SSHKey | tuple:
    """A key (and its certificate) handed over as text, e.g. by the authenticator."""
    try:
        key = asyncssh.import_private_key(key_text)
        if not certificate_text:
            return key
        return key, asyncssh.import_certificate(certificate_text)
    except (asyncssh.KeyImportError, ValueError) as error:
        raise ClusterUnreachable(
            f"The SSH key from the login (auth_state) cannot be used: {error}. Log out and log "
            "in again; if it persists, tell an administrator."
        ) from None


def mint(
    ca_key: asyncssh.SSHKey,
    principal: str,
    key_id: str,
    minutes: float,
    start: float | None = None,
) -> Certified:
    """A new ed25519 key and a user certificate for ``principal``, valid from ``start``
    (default: now, less the clock skew allowance) for ``minutes``."""
    now = time.time() if start is None else start
    valid_after = now - CLOCK_SKEW_SECONDS
    valid_before = now + minutes * 60
    key = asyncssh.generate_private_key("ssh-ed25519")
    certificate = ca_key.generate_user_certificate(
        key, key_id, principals=[principal], valid_after=int(valid_after),
        valid_before=int(valid_before),
        permit_x11_forwarding=False, permit_agent_forwarding=False, permit_pty=False,
        permit_user_rc=False,
    )
    return Certified(key, certificate, valid_before)
