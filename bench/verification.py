"""What verifying a signed file costs at load: `python -m bench.verification`.

For each model (the trained file from the models folder, else its untrained export: the
same graph and size), a fresh EC P-256 key signs a copy (training/sign.py) and the
service's check (contract/trust.py, `TrustedKeys.verify` on the bytes read) is timed,
beside the whole load of the same file with it (read, verification, session, warm-up,
self-check: what the service does before serving a file). Prints a Markdown table.
"""

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.modelfiles import model_files
from contract import hardware
from contract.classifier import Classifier
from contract.trust import TrustedKeys
from training.models import MODEL_IDS
from training.sign import sign_file


def make_key(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "signing.pem", folder / "signing.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


def measure(path: Path, keys: TrustedKeys, verifies: int, loads: int) -> dict:
    content = path.read_bytes()
    verify_seconds, hash_seconds = [], []
    for _ in range(verifies):
        started = time.perf_counter()
        keys.verify(path, content)
        verify_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        hashlib.sha256(content).digest()  # the part that grows with the file
        hash_seconds.append(time.perf_counter() - started)
    load_seconds = []
    for _ in range(loads):
        started = time.perf_counter()
        Classifier(path, "cpu", 0, 1, trusted=keys).warm_up()
        load_seconds.append(time.perf_counter() - started)
    return {
        "megabytes": len(content) / 1e6,
        "verify_ms": statistics.median(verify_seconds) * 1000,
        "verify_range_ms": (min(verify_seconds) * 1000, max(verify_seconds) * 1000),
        "sha256_ms": statistics.median(hash_seconds) * 1000,
        "load_ms": statistics.median(load_seconds) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verification", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--verifies", type=int, default=30, help="timed verifications a file")
    parser.add_argument("--loads", type=int, default=3, help="timed whole loads a file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        files = model_files(args.models_dir, work, MODEL_IDS)
        private, public = make_key(work)
        started = time.perf_counter()
        keys = TrustedKeys(public)  # the first use imports model-signing and sigstore
        setup_ms = (time.perf_counter() - started) * 1000
        rows = []
        for model_id, (path, weights) in files.items():
            sign_file(path, private)
            rows.append((model_id, weights, measure(path, keys, args.verifies, args.loads)))
    cpu = hardware.cpu()
    print(f"CPU: {cpu['cpu']} ({', '.join(cpu['cpu_flags'])}), {os.cpu_count()} cores; load "
          f"average {os.getloadavg()[0]:.2f}; reading the key and importing model-signing "
          f"{setup_ms:.0f} ms, once per process\n")  # fmt: skip
    print("| file | size | verification (median, min-max) | of which SHA-256 | whole load "
          "with it | share |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for model_id, weights, m in rows:
        low, high = m["verify_range_ms"]
        share = m["verify_ms"] / m["load_ms"]
        print(f"| {model_id} ({weights}) | {m['megabytes']:.1f} MB | {m['verify_ms']:.1f} ms "
              f"({low:.1f}-{high:.1f}, {args.verifies} runs) | {m['sha256_ms']:.1f} ms | "
              f"{m['load_ms']:.0f} ms ({args.loads} runs) | {share:.1%} |")  # fmt: skip
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
