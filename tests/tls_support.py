"""Certificates made at test time with the ``openssl`` CLI (tests/ is on sys.path via conftest).

``make_pki(folder)``: a CA, a server certificate it signed for 127.0.0.1 and localhost, a client
certificate it signed, and a client certificate of another CA (which a server must refuse).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DAYS = "2"
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def make_pki(folder: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: cannot make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    rogue_ca = _ca(folder, "rogue-ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost", "serverAuth")
    client = _leaf(folder, "client", ca, "subjectAltName=DNS:client", "clientAuth")
    rogue = _leaf(folder, "rogue", rogue_ca, "subjectAltName=DNS:rogue", "clientAuth")
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        rogue_cert=rogue[0],
        rogue_key=rogue[1],
    )


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *EC_KEY, "-keyout", key, "-out", cert, "-days", DAYS,
        "-subj", f"/CN=rnnserve test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(
    folder: Path, name: str, ca: tuple[Path, Path], san: str, usage: str
) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(f"{san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl("req", *EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", DAYS, "-extfile", extensions,
    )  # fmt: skip
    return cert, key
