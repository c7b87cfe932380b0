"""Signing exported files: a signature bundle beside each, `<file>.sig`, that
contract/trust.py verifies wherever the file is loaded with TRUSTED_KEYS set.

The bundle is OpenSSF model signing's (the `model-signing` package, sigstore/
model-transparency): an in-toto statement of the file's SHA-256 digest in a DSSE envelope,
signed with an elliptic-curve private key (EC P-256: see docs/trust.md for making one and
where it lives). No transparency log is contacted. `model_signing verify key` checks the
same bundles from the command line.

What is signed: each exported file (models/<id>.onnx), its int8 and float16 twins
(models/<id>-int8.onnx, -float16.onnx) and the Triton repository's copies
(model_repository/<id>/1/model.onnx); `export`, `train-export` and `export-triton` sign what
they write when a key is configured (--signing-key, or SIGNING_KEY).
"""

import argparse
import os
from pathlib import Path

from contract.trust import bundle_path, fingerprint
from training.errors import TrainingError

SIGNING_KEY_ENV = "SIGNING_KEY"


class SigningError(TrainingError):
    """No key, a key that cannot sign, or nothing to sign."""


def default_key() -> Path | None:
    """$SIGNING_KEY, the private key the commands sign with unless told otherwise."""
    return Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None


def key_option() -> argparse.ArgumentParser:
    """--signing-key, for the commands that write files: sign them when it is set."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=default_key(),
        help="EC private key (PEM) to sign each file written with, a bundle <file>.sig beside "
        f"it (default: ${SIGNING_KEY_ENV}; unset: not signed)",
    )
    return parser


def sign_file(path: Path, key: Path) -> Path:
    """Write `path`'s signature bundle beside it (to a temporary name, then renamed, so a
    service polling the folder never reads half a bundle); return the bundle's path."""
    import model_signing

    path, bundle = Path(path), bundle_path(path)
    temporary = bundle.with_name(f".{bundle.name}.{os.getpid()}.tmp")
    try:
        signer = model_signing.signing.Config().use_elliptic_key_signer(private_key=key)
        signer.sign(path, temporary)
        os.replace(temporary, bundle)
    except (OSError, ValueError, TypeError) as err:  # no key, not a key, not EC, a password
        raise SigningError(f"cannot sign {path} with {key}: {err}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return bundle


def key_fingerprint(key: Path) -> str:
    """The fingerprint (contract.trust.fingerprint) of a private key's public half: what
    /models shows for files it signed."""
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    except (OSError, ValueError, TypeError) as err:
        raise SigningError(f"{key}: not a PEM private key without a password ({err})") from None
    return fingerprint(private.public_key())


def files_to_sign(paths: list[Path]) -> list[Path]:
    """Each path, a folder standing for every .onnx file under it (a models folder, a
    Triton repository), sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.onnx") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise SigningError(f"{path}: no such file or folder")
    return found


def report_written(path: Path, key: Path | None) -> None:
    """Print that `path` was written, signing it first when a key is configured (what
    `export`, `train-export` and the twins do with each file they write)."""
    if key is None:
        print(f"Wrote {path}", flush=True)
        return
    bundle = sign_file(path, key)
    print(f"Wrote {path}, signed by {key_fingerprint(key)} in {bundle.name}", flush=True)
