"""A deployment's credentials: a private CA, the SuperLink's TLS certificate and one authentication key pair per
SuperNode (`fedlora deploy credentials`), written with `cryptography`.

Imports neither Flower nor torch: a machine that only writes credentials needs neither.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError, FedloraError
from ..core.names import safe_name
from .app import no_repeats


@dataclass
class Credentials:
    """Paths of a deployment's TLS certificates and SuperNode authentication keys."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_keys: dict[str, Path]  # name -> private key (OpenSSH); the public key is the same path + ".pub"
    hosts: list[str] = field(default_factory=list)  # the names and addresses the SuperLink certificate is valid for

    def public_key(self, name: str) -> Path:
        """The OpenSSH public key file to register for SuperNode `name`."""
        return self.supernode_keys[name].with_name(self.supernode_keys[name].name + ".pub")


CA_FILES = ("ca.crt", "ca.key", "superlink.crt", "superlink.key")


def write_credentials(out_dir: str | Path, supernodes: list[str], hosts: list[str] = ("127.0.0.1", "localhost"),
                      days: int = 365, overwrite: bool = False) -> Credentials:
    """A private CA, a SuperLink certificate for `hosts` (and 127.0.0.1), and one EC P-384 key pair per SuperNode.

    Refuses to replace existing credentials unless `overwrite`. Written with `cryptography` (Flower's own
    dependency) rather than by calling openssl and ssh-keygen, so it works wherever fedlora is installed;
    docs/deployment.md gives the equivalent openssl commands."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = _supernode_names(supernodes)  # before anything is written: a name becomes a path below
    root = Path(out_dir)
    # the Fleet gateway reaches the SuperLink, and the operator its Control API, on 127.0.0.1
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1"]))
    _clear_old_credentials(root, overwrite)
    (root / "supernodes").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def certificate(subject: str, key, issuer: x509.Name, signer, ca: bool, sans=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(signer, hashes.SHA384())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    ca_cert = certificate("fedlora deployment CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate(hosts[0], server_key, ca_name, ca_key, ca=False, sans=[_san(h) for h in hosts])

    _write(root / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(root / "ca.key", pem_key(ca_key), private=True)
    _write(root / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(root / "superlink.key", pem_key(server_key), private=True)
    keys = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST curves; P-384 as in its guide
        keys[name] = root / "supernodes" / name
        _write(keys[name], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), private=True)
        _write(keys[name].with_name(f"{name}.pub"),
               key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return Credentials(root, root / "ca.crt", root / "superlink.crt", root / "superlink.key", keys, hosts)


def _supernode_names(supernodes: list[str]) -> list[str]:
    names = [safe_name(name, "SuperNode name") for name in supernodes]
    no_repeats(names, "SuperNode name")
    for name in names:
        if f"{name}.pub" in names:
            raise ConfigError(f"SuperNode names {name!r} and '{name}.pub' collide: {name}'s public key is "
                              f"{name}.pub; rename one")
    return names


def _clear_old_credentials(root: Path, overwrite: bool) -> None:
    """Refuse to write over a deployment's credentials unless asked; then remove its old SuperNode keys too."""
    old_keys = sorted((root / "supernodes").glob("*.pub"))
    found = [root / f for f in CA_FILES if (root / f).exists()] + old_keys
    if not found:
        return
    if not overwrite:
        raise FedloraError(f"{root} already holds credentials ({', '.join(p.name for p in found[:6])}"
                           f"{', ...' if len(found) > 6 else ''}); a new CA invalidates every certificate handed out "
                           "and new keys must be registered again. To replace them pass overwrite=True "
                           "(`fedlora deploy credentials --force`), or write to another directory")
    for public in old_keys:  # so that `deploy app --credentials` lists only the SuperNodes of this generation
        public.unlink()
        public.with_name(public.name[:-len(".pub")]).unlink(missing_ok=True)


def supernode_names(credentials_dir: str | Path) -> list[str]:
    """The SuperNode names of a credentials directory (its supernodes/<name>.pub keys), sorted."""
    keys = sorted(Path(credentials_dir, "supernodes").glob("*.pub"))
    if not keys:
        raise FedloraError(f"no SuperNode keys in {Path(credentials_dir) / 'supernodes'}: write them with "
                           "`fedlora deploy credentials`")
    return [safe_name(key.name[:-len(".pub")], "SuperNode name") for key in keys]


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:  # created 0600, never readable by others, not even for a moment
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


__all__ = ["Credentials", "supernode_names", "write_credentials"]
