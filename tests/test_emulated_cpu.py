"""The numeric promises on an AVX2-only CPU, whatever CPU runs the suite.

onnxruntime picks its kernels from CPUID when it starts: on a CPU with AVX-512 VNNI or
AMX its int8 and float paths differ from an AVX2-only CPU's, and a promise measured on
one need not hold on the other. Debian's qemu-user runs this project's Python under an
emulated Haswell (AVX2 and FMA; no AVX-512, no VNNI, no AMX), so onnxruntime takes its
AVX2 paths.

Emulation costs about a hundred times the native time for float convolutions (measured:
~0.6 s per image for the small model's float file), so only what must run on the AVX2
kernels runs there, on files made natively (by the session's fixtures, on whatever CPU
runs the suite: an AVX-512 or AMX machine is the case that matters):
  - every file's self-check, as the service runs it when it loads the file: the float
    file (its familiarity ranks against its stored validation distances included), the
    int8 and the float16 twins;
  - the int8 twin's outputs for the test split, through each engine that offers int8
    (onnxruntime and OpenVINO), which its gate then judges here against the float file's
    (computed natively: the float file's own self-check has just shown that its outputs
    there equal these);
  - which engine and precision the automatic choice takes there: never bfloat16, which
    an AVX2 CPU does not compute (OpenVINO asks CPUID itself, and says so).
Not run under emulation: quantizing (its ranges are float computations, which the float
file's self-check shows agree across CPUs) and the float16 gate (float16 is for GPUs; its
self-check runs).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from contract.classifier import Classifier
from tests.conftest import VAL_SIZE
from training import float16, quantize
from training.data import load
from training.twins import as_trained, card_of, compare_outputs

MODEL = "cifar100-712868"
ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")
EMULATED_CPU = "Haswell"  # AVX2 + FMA, the oldest x86-64 servers onnxruntime targets

# Runs in the emulated interpreter: each file loaded as the service loads it (batches of
# one, so the warm-up is one image), then the int8 file on the test images.
EMULATED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from contract.classifier import Classifier
    from service.errors import InvalidModel
    from contract.hardware import cpu

    folder, images, out = Path(sys.argv[1]), np.load(sys.argv[2]), Path(sys.argv[3])
    result = {"cpu": cpu(), "loaded": {}}
    for path in sorted(folder.glob("*.onnx")):
        try:
            model = Classifier(path, "cpu", 2, 1, max_batch_size=1, precision="auto")
            model.warm_up()
            result["loaded"][path.name] = {"way": str(model.way), "declined": model.declined}
        except InvalidModel as err:
            result["loaded"][path.name] = err.message
    for engine in ("onnxruntime", "openvino"):
        int8 = Classifier(folder / sys.argv[4], "cpu", 2, 1, engine=engine)
        parts = [int8.run(images[i : i + 64]) for i in range(0, len(images), 64)]
        joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        np.savez(out / f"{engine}.npz", **joined)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def qemu() -> str:
    if QEMU is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: .ci/run installs Debian's qemu-user")
        pytest.skip("needs Debian's qemu-user (qemu-x86_64); .ci/run installs it")
    return QEMU


@pytest.fixture(scope="module")
def data(cifar_tarball):
    return load(cifar_tarball, val_size=VAL_SIZE)


@pytest.fixture(scope="module")
def native(models_dir, data, tmp_path_factory) -> Path:
    """The float file and its twins, all made on this machine's CPU."""
    folder = tmp_path_factory.mktemp("native")
    shutil.copy(models_dir / f"{MODEL}.onnx", folder)
    quantize.export_int8(folder / f"{MODEL}.onnx", folder / f"{MODEL}-int8.onnx", data)
    float16.export_float16(folder / f"{MODEL}.onnx", folder / f"{MODEL}-float16.onnx", data)
    return folder


@pytest.fixture(scope="module")
def emulated(qemu, native, data, tmp_path_factory) -> tuple[dict, dict]:
    scratch = tmp_path_factory.mktemp("emulated")
    test = as_trained(data, card_of_file(native / f"{MODEL}.onnx")).test
    np.save(scratch / "test.npy", test.images)
    arguments = [str(native), str(scratch / "test.npy"), str(scratch), f"{MODEL}-int8.onnx"]
    command = [qemu, "-cpu", EMULATED_CPU, sys.executable, "-c", EMULATED, *arguments]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    outputs = {}
    for engine in ("onnxruntime", "openvino"):
        with np.load(scratch / f"{engine}.npz") as saved:
            outputs[engine] = dict(saved)
    return json.loads(lines[-1].removeprefix("RESULT ")), outputs


def card_of_file(path: Path):
    return card_of(onnx.load(path))


def test_the_emulated_cpu_is_avx2_without_avx512_or_vnni(emulated):
    result, _ = emulated
    assert result["cpu"]["cpu_flags"] == ["avx2"], result["cpu"]
    assert result["cpu"]["int8_kernels"] == "AVX2 (no VNNI)"


def test_files_made_on_this_cpu_keep_their_self_checks_on_avx2(emulated, native):
    """Each file served by the first way the AVX2 CPU offers it, its promise kept there:
    float32 on onnxruntime (no bfloat16 here, and OpenVINO says why), the int8 twin on
    onnxruntime's int8 kernels (OpenVINO's go first only with AMX), the float16 twin on
    onnxruntime."""
    result, _ = emulated
    names = sorted(path.name for path in native.glob("*.onnx"))
    assert names == [f"{MODEL}-float16.onnx", f"{MODEL}-int8.onnx", f"{MODEL}.onnx"]
    loaded = result["loaded"]
    assert {name: loaded[name]["way"] if isinstance(loaded[name], dict) else loaded[name]
            for name in names} == {
        f"{MODEL}.onnx": "onnxruntime float32 on the CPU",
        f"{MODEL}-int8.onnx": "onnxruntime int8 on the CPU",
        f"{MODEL}-float16.onnx": "onnxruntime float16 on the CPU",
    }, loaded  # fmt: skip
    (no_bfloat16,) = loaded[f"{MODEL}.onnx"]["declined"]
    assert no_bfloat16.startswith("openvino bfloat16: this CPU has no bfloat16 instructions")
    assert "BF16" not in no_bfloat16.split("reports")[1]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_int8_file_keeps_its_gate_on_avx2(emulated, native, data, engine):
    """The gate `export --precision int8` applied here, on outputs the AVX2 kernels of
    each engine computed: top-1 within a point of the float model's (in whole images),
    familiarity within 0.05 on average."""
    outputs = emulated[1][engine]
    card = card_of_file(native / f"{MODEL}-int8.onnx")
    test = as_trained(data, card).test
    reference = Classifier(native / f"{MODEL}.onnx", "cpu", 1, 1, engine="onnxruntime").run(
        test.images
    )
    comparison = compare_outputs(outputs, reference, test.fine, card)
    comparison["limits"] = card.evaluation["limits"]
    assert comparison["limits"] == {"top1_accuracy_drop": 0.01,
                                    "familiarity_mean_abs_difference": 0.05}  # fmt: skip
    assert quantize.int8_problems(comparison) == [], comparison
    # The gate's own arithmetic, by hand, on the same outputs.
    int8_right = int((outputs["probabilities"].argmax(1) == test.fine).sum())
    float_right = int((reference["probabilities"].argmax(1) == test.fine).sum())
    assert float_right - int8_right <= 0.01 * len(test)
    assert np.abs(outputs["familiarity"] - reference["familiarity"]).mean() <= 0.05
