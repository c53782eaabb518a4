"""hub_spawner/certificates.py: certipy signs with an authority made elsewhere (a Subject Key
Identifier that is not certipy's SHA-1 of the key, as Helm's genCA makes with Go >= 1.25), and
OpenSSL chains the result. Real certipy, real cryptography and the real ``openssl verify``."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def foreign_authority(directory: Path) -> dict[str, str]:
    """A CA whose Subject Key Identifier is derived some other way (here: SHA-256, truncated)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub notebooks-ca")])
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.PKCS1)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier(digest.finalize()[:20]), critical=False)
            .sign(key, hashes.SHA256()))
    paths = {"key": str(directory / "ca.key"), "cert": str(directory / "ca.crt")}
    Path(paths["key"]).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    Path(paths["cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def sign_and_verify(tmp_path: Path, patched: bool) -> subprocess.CompletedProcess:
    """In a new interpreter (certipy unpatched unless asked): sign a server's pair with the
    foreign authority as JupyterHub does (external record, create_signed_pair), then ask
    ``openssl verify`` whether it chains."""
    ca = foreign_authority(tmp_path)
    store = tmp_path / ("patched" if patched else "plain")
    script = textwrap.dedent(f"""
        from certipy import Certipy
        if {patched!r}:
            from hub_spawner.certificates import copy_issuer_key_ids
            copy_issuer_key_ids()
            copy_issuer_key_ids()  # idempotent
        certipy = Certipy(store_dir={str(store)!r})
        certipy.store.add_record("notebooks-ca", is_ca=True, files={ca!r}, overwrite=True)
        record = certipy.create_signed_pair("user-alice", "notebooks-ca",
                                            alt_names=["DNS:hub-tunnels"])
        print(record["files"]["cert"])
    """)
    signed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True).stdout.strip()
    return subprocess.run(["openssl", "verify", "-CAfile", ca["cert"], signed],
                          capture_output=True, text=True)


def test_a_certificate_signed_with_a_foreign_authority_chains_once_patched(tmp_path):
    plain = sign_and_verify(tmp_path, patched=False)
    assert plain.returncode != 0 and "unable to get local issuer" in plain.stdout + plain.stderr
    patched = sign_and_verify(tmp_path, patched=True)
    assert patched.returncode == 0, patched.stdout + patched.stderr


@pytest.mark.parametrize("has_ski", [True, False])
def test_only_an_authority_key_identifier_changes_and_only_when_the_issuer_names_one(
        tmp_path, has_ski):
    from hub_spawner.certificates import with_issuer_key_id

    issuer = x509.load_pem_x509_certificate(
        Path(foreign_authority(tmp_path)["cert"]).read_bytes())
    if not has_ski:
        issuer = type("NoSki", (), {"extensions": x509.Extensions([])})()
    computed = x509.AuthorityKeyIdentifier(b"\x00" * 20, None, None)
    usage = x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH])
    assert with_issuer_key_id(usage, issuer) is usage
    result = with_issuer_key_id(computed, issuer)
    if has_ski:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert result.key_identifier == ski.digest
    else:
        assert result is computed
