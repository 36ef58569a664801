"""Throw-away certificates for the embedded stack (``xrec dev --tls``) and the tests, made
with the ``openssl`` command line (``apt-get install openssl``).

Why the CLI and not the ``cryptography`` package: openssl is on every machine that has
Debian's redis-server (which ``--tls`` needs anyway), and the files are exactly what a
production CA hands out (PEM, RSA 2048, SHA-256). The CA's and leaves' keys are written
with mode 600; nothing here is meant to outlive its folder (valid ``days``, 2 by default).

>>> from pathlib import Path; import tempfile                     # doctest: +SKIP
>>> tls = dev_certs(Path(tempfile.mkdtemp()))                     # doctest: +SKIP
>>> tls.ca.name, tls.cert.name, tls.key.name                      # doctest: +SKIP
('ca.pem', 'server.pem', 'server.key')
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from streams.errors import StackError

__all__ = ["DevCerts", "make_ca", "make_leaf", "dev_certs", "openssl_binary", "INSTALL_HINT"]

#: what to install when a binary that ``--tls`` needs is missing
INSTALL_HINT = "apt-get install redis-server openssl"
#: subjectAltName of every leaf: clients check the host name they dialled
LEAF_SAN = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class DevCerts:
    """A CA and one server certificate signed by it (clients trust ``ca``)."""

    ca: Path
    cert: Path
    key: Path


def openssl_binary() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise StackError(f"no openssl binary to make the TLS certificates: `{INSTALL_HINT}`")
    return found


def _openssl(d: Path, *args: str) -> None:
    try:
        # umask 077: a key is never readable by others, not even before _private()
        subprocess.run([openssl_binary(), *args], cwd=d, check=True, capture_output=True,
                       timeout=60, umask=0o077)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise StackError(f"openssl {args[0]} failed in {d}: {err[0]}") from None


def _private(path: Path) -> None:
    if path.exists():
        path.chmod(0o600)


def make_ca(d: Path, name: str = "ca", days: int = 2) -> Path:
    """``name.pem`` (self-signed CA certificate) and ``name.key`` in ``d``; returns the pem."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", str(days), "-subj", f"/CN=xrec throw-away {name}")
    _private(d / f"{name}.key")
    return d / f"{name}.pem"


def make_leaf(d: Path, name: str, ca: str = "ca", days: int = 2) -> Path:
    """``name.pem`` / ``name.key``: a certificate for 127.0.0.1 and localhost (server and
    client use) signed by ``ca.pem`` / ``ca.key`` in ``d``; returns the pem."""
    ext = d / f"{name}.ext.cnf"
    ext.write_text(f"subjectAltName={LEAF_SAN}\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", "/CN=127.0.0.1")
    _private(d / f"{name}.key")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days),
             "-extfile", ext.name)
    for tmp in (ext, d / f"{name}.csr"):
        tmp.unlink(missing_ok=True)
    return d / f"{name}.pem"


def dev_certs(d: Path, days: int = 2) -> DevCerts:
    """A fresh CA and server certificate in ``d`` (mode 700), as ``xrec dev --tls`` uses."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    make_ca(d, "ca", days)
    make_leaf(d, "server", "ca", days)
    return DevCerts(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
