"""internal_ssl with authorities made elsewhere (the Helm chart's): certificates that OpenSSL
can chain.

certipy, which JupyterHub's internal_ssl signs with, writes each certificate's Authority Key
Identifier from the issuer's public key (SHA-1) instead of copying the issuer's Subject Key
Identifier, as RFC 5280 asks. The two agree only for authorities that certipy made itself. For
others, such as Helm's ``genCA`` (Go >= 1.25 derives the identifier with truncated SHA-256),
OpenSSL then finds no issuer and refuses every certificate the hub signs. ``copy_issuer_key_ids``
makes certipy copy the issuer's own identifier; for certipy's own authorities nothing changes.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from cryptography import x509

_PATCHED = "_hub_spawner_copies_issuer_key_ids"


def copy_issuer_key_ids() -> None:
    """Make ``certipy.Certipy.sign`` set the Authority Key Identifier from the issuer
    certificate's Subject Key Identifier (when it has one). Idempotent."""
    from certipy import Certipy

    if getattr(Certipy.sign, _PATCHED, False):
        return
    original = Certipy.sign

    @functools.wraps(original)
    def sign(self: Any, req: Any, issuer_cert_key: Any, *args: Any, **kwargs: Any) -> Any:
        issuer_cert = issuer_cert_key[0]
        extensions = kwargs.get("extensions")
        if extensions is None and len(args) >= 3:
            extensions = args[2]
        if extensions:
            extensions[:] = [(with_issuer_key_id(ext, issuer_cert), critical)
                             for ext, critical in extensions]
        return original(self, req, issuer_cert_key, *args, **kwargs)

    setattr(sign, _PATCHED, True)
    Certipy.sign = sign


def with_issuer_key_id(extension: Any, issuer_cert: x509.Certificate) -> Any:
    """``extension``, or for an Authority Key Identifier, one that names ``issuer_cert``'s own
    Subject Key Identifier."""
    if not isinstance(extension, x509.AuthorityKeyIdentifier):
        return extension
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return extension
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def alt_name(host: str) -> str:
    """How a certificate names ``host``: ``IP:10.0.0.1`` or ``DNS:login-ib0``."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"
