"""Helpers for the tests of signed files: keys made with openssl as docs/trust.md makes
them, and a file changed after signing."""

import hashlib
import subprocess
from pathlib import Path


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


def make_key(folder: Path, name: str) -> tuple[Path, Path, str]:
    """An EC P-256 key pair as docs/trust.md makes it: (private, public, fingerprint by
    openssl: the SHA-256 of the public key's DER form, its first 16 hex digits)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private))
    openssl("ec", "-in", str(private), "-pubout", "-out", str(public))
    der = openssl("pkey", "-pubin", "-in", str(public), "-outform", "DER")
    return private, public, "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def flip_byte(path: Path) -> None:
    """One byte changed in the middle of the file (its initializers: still loadable)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
