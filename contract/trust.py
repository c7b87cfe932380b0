"""Whose file this is: OpenSSF model signing (sigstore/model-transparency's `model-signing`)
checked for the very bytes a loader holds.

A file's self-check proves that it computes what its own references say; it cannot tell
a file that someone replaced with another, carrying consistent references. So a file may
carry a signature bundle beside it, `<file>.sig` (`models/x.onnx` -> `models/x.onnx.sig`):
a Sigstore bundle holding a DSSE envelope around an in-toto statement that names the
file's SHA-256 digest, signed with an elliptic-curve private key (`python -m training
sign`, or `model_signing sign key`). No transparency log is contacted, either way.

With trusted public keys (the service's TRUSTED_KEYS: a key file, or a folder of them so
that two can be trusted at once while keys rotate), a file is accepted only if its bundle
is signed by one of them and the digest it signs is the digest of the bytes the loader
read: the bytes that become the engine are the bytes verified, so a file replaced after
the check is never what runs. `model_signing.verifying.Config.verify` would hash the file
again from its path; here the library verifies the bundle and returns the signed
manifest, and the digest is compared with the bytes in memory.

Without trusted keys nothing is checked and a file's provenance reads "not verified".
"""

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from contract.errors import ContractError, InvalidModel
from contract.files import open_regular

BUNDLE_SUFFIX = ".sig"
NOT_VERIFIED = "not verified"
MAX_BUNDLE_BYTES = 1 << 20  # ours are about 1.4 KB; anything this large is not one
MAX_KEY_BYTES = 64 * 1024
# The one manifest entry a bundle made for a single file has: the file itself.
SINGLE_FILE = "."


class UnusableKeys(ContractError):
    """TRUSTED_KEYS names no usable public key: nothing could be verified, so nothing
    starts."""


def bundle_path(path: Path) -> Path:
    """Where a file's signature bundle lives: beside it, its name plus `.sig`."""
    path = Path(path)
    return path.with_name(path.name + BUNDLE_SUFFIX)


def fingerprint(public_key) -> str:
    """`sha256:` and the first 16 hex digits of the SHA-256 of the key's DER
    SubjectPublicKeyInfo: `openssl pkey -pubin -in KEY.pub -outform DER | sha256sum`."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    fingerprint: str
    hint: str  # what model-signing writes in a bundle to name its key: sha256 of the PEM
    verifier: object  # model-signing's elliptic-key verifier for this key


class TrustedKeys:
    """The public keys files must be signed with; `verify` checks one file's bytes."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        self.keys = tuple(_load_key(path) for path in _key_files(self.source))
        if not self.keys:
            raise UnusableKeys(f"TRUSTED_KEYS={self.source}: the folder holds no key file")

    @property
    def fingerprints(self) -> list[str]:
        return [key.fingerprint for key in self.keys]

    def verify(self, path: Path, content: bytes) -> str:
        """ "verified by <fingerprint>" when `content` (the bytes read from `path`) is what
        a trusted key signed in the bundle beside `path`; InvalidModel with the reason
        otherwise."""
        from cryptography.exceptions import InvalidSignature

        name = Path(path).name
        signature = _read_bundle(Path(path))
        public_key = signature.bundle.verification_material.public_key
        if public_key is None:  # a certificate chain, or a Sigstore identity's certificate
            raise InvalidModel(
                f"{name}: its bundle is not signed with a key (a certificate or a Sigstore "
                "identity); TRUSTED_KEYS verifies key signatures"
            )
        hint = public_key.hint
        # The bundle names its key: try that one (a bundle without a name: every key).
        candidates = [key for key in self.keys if not hint or key.hint == hint]
        if not candidates:
            raise InvalidModel(
                f"{name}: signed by a key that TRUSTED_KEYS does not hold (it trusts "
                f"{', '.join(self.fingerprints)})"
            )
        for key in candidates:
            try:
                manifest = key.verifier.verify(signature)
            except InvalidSignature:
                continue
            except Exception as err:  # a well-signed envelope around something else
                raise InvalidModel(
                    f"{name}: its signature bundle is not a model signature ({_short(err)})"
                ) from err
            _check_digest(name, manifest, content)
            return f"verified by {key.fingerprint}"
        raise InvalidModel(
            f"{name}: its bundle's signature does not verify with "
            f"{' or '.join(k.fingerprint for k in candidates)}: the bundle was altered"
        )


def provenance(path: Path, content: bytes, trusted: TrustedKeys | None) -> str:
    """What a loader records of a file it has just read: "not verified" without trusted
    keys, else `trusted.verify` (which refuses the file unless it is signed)."""
    return NOT_VERIFIED if trusted is None else trusted.verify(path, content)


def _key_files(source: Path) -> list[Path]:
    try:
        mode = os.stat(source).st_mode
    except OSError as err:
        raise UnusableKeys(f"TRUSTED_KEYS={source}: {err.strerror}") from None
    if not stat.S_ISDIR(mode):
        return [source]
    # Every visible file: a Kubernetes Secret mounted as a folder shows its keys as
    # files and keeps its own bookkeeping in hidden `..data` entries.
    return sorted(p for p in source.iterdir() if not p.name.startswith(".") and not p.is_dir())


def _load_key(path: Path) -> TrustedKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from model_signing._signing import sign_ec_key

    try:
        with open_regular(path)[0] as file:
            pem = file.read(MAX_KEY_BYTES + 1)
    except OSError as err:
        raise UnusableKeys(f"TRUSTED_KEYS: {path}: {err.strerror}") from None
    if b"PRIVATE KEY" in pem:
        raise UnusableKeys(
            f"TRUSTED_KEYS: {path} is a private key; it must hold public keys only "
            "(openssl ec -in KEY.pem -pubout)"
        )
    try:
        public_key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise UnusableKeys(f"TRUSTED_KEYS: {path} is not a PEM public key") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise UnusableKeys(f"TRUSTED_KEYS: {path} is not an elliptic-curve key (P-256)")
    try:
        verifier = sign_ec_key.Verifier(path)
    except ValueError as err:  # a curve model-signing does not take
        raise UnusableKeys(f"TRUSTED_KEYS: {path}: {err}") from None
    reserialized = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TrustedKey(
        path, fingerprint(public_key), hashlib.sha256(reserialized).hexdigest(), verifier
    )


def _read_bundle(path: Path):
    from model_signing._signing import sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_v1

    bundle = bundle_path(path)
    try:
        file, size = open_regular(bundle)
        with file:
            if size > MAX_BUNDLE_BYTES:
                raise InvalidModel(f"{path.name}: {bundle.name} is {size:,} bytes: not a bundle")
            text = file.read(MAX_BUNDLE_BYTES)
    except FileNotFoundError:
        raise InvalidModel(
            f"{path.name}: no signature bundle ({bundle.name}) beside it, and TRUSTED_KEYS "
            "is set: sign it (python -m training sign)"
        ) from None
    except OSError as err:
        raise InvalidModel(f"{path.name}: {bundle.name} cannot be read ({err.strerror})") from None
    try:
        return sign_sigstore_pb.Signature(bundle_v1.Bundle.from_dict(json.loads(text)))
    except Exception as err:  # not JSON, not a bundle: pydantic's and json's own errors
        raise InvalidModel(
            f"{path.name}: {bundle.name} is not a signature bundle ({_short(err)})"
        ) from None


def _check_digest(name: str, manifest, content: bytes) -> None:
    """The signed manifest must name one thing, the file itself, with the SHA-256 of
    exactly `content`."""
    entries = [(d.identifier, d.digest.algorithm, d.digest.digest_hex)
               for d in manifest.resource_descriptors()]  # fmt: skip
    if len(entries) != 1 or entries[0][:2] != (SINGLE_FILE, "sha256"):
        raise InvalidModel(
            f"{name}: its bundle signs {len(entries)} item(s) "
            f"({', '.join(f'{i} by {a}' for i, a, _ in entries[:3])}), not this one file by "
            "sha256; sign the file itself"
        )
    signed, actual = entries[0][2], hashlib.sha256(content).hexdigest()
    if signed != actual:
        raise InvalidModel(
            f"{name}: its bytes are not the bytes signed (sha256 {actual[:16]}..., the bundle "
            f"signs {signed[:16]}...): the file changed after signing"
        )


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
