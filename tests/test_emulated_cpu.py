"""The numeric promises on an AVX2-only CPU, whatever CPU runs the suite.

onnxruntime picks its kernels from CPUID when it starts: on a CPU with AVX-512 VNNI or
AMX its int8 and float paths differ from an AVX2-only CPU's, and a promise measured on
one need not hold on the other. Debian's qemu-user runs this project's Python under an
emulated Haswell (AVX2 and FMA; no AVX-512, no VNNI, no AMX), so onnxruntime takes its
AVX2 paths. Emulation is slow: the models are trained and exported natively (the
session's fixtures), the twins made natively too; then, emulated:
  - every file's self-check, as the service runs it when it loads the file (the float
    file, and the int8 and float16 twins made on the native CPU);
  - the familiarity calibration: the validation images' ranks are 0, 1/V, ..., (V-1)/V;
  - `export --precision int8` and `float16` made there: their gates and self-checks hold;
and natively again, the twins made under emulation pass their self-checks here.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.classifier import Classifier
from service.hardware import cpu
from tests.conftest import VAL_SIZE
from training import float16, quantize
from training.data import load

MODEL = "cifar100-712868"
ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")
EMULATED_CPU = "Haswell"  # AVX2 + FMA, as the oldest x86-64 servers onnxruntime targets

EMULATED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from service.classifier import Classifier
    from service.errors import InvalidModel
    from service.hardware import cpu
    from service.modelcard import FAMILIARITY_NAME
    from training import float16, quantize
    from training.data import load
    from training.errors import ExportError

    folder, out, data_path, val_size = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    result = {"cpu": cpu(), "loaded": {}, "exported": {}}
    for path in sorted(folder.glob("*.onnx")):
        try:
            model = Classifier(path, "cpu", 1, 1, max_batch_size=64)
            model.warm_up()
            result["loaded"][path.name] = "ok"
        except InvalidModel as err:
            result["loaded"][path.name] = err.message
    data = load(data_path, val_size=val_size)
    source = folder / "MODEL.onnx"
    model = Classifier(source, "cpu", 1, 1)
    ranks = np.sort(model.run(data.val.images)[FAMILIARITY_NAME][:, 0]) * len(data.val)
    result["familiarity_rank_error"] = float(np.abs(ranks - np.arange(len(data.val))).max())
    for name, export in (("int8", quantize.export_int8), ("float16", float16.export_float16)):
        try:
            card = export(source, out / f"MODEL-{name}.onnx", data)
            result["exported"][name] = card.evaluation
        except ExportError as err:
            result["exported"][name] = str(err)
    print("RESULT " + json.dumps(result))
    """
).replace("MODEL", MODEL)


@pytest.fixture(scope="module")
def qemu() -> str:
    if QEMU is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: .ci/run installs Debian's qemu-user")
        pytest.skip("needs Debian's qemu-user (qemu-x86_64); .ci/run installs it")
    return QEMU


@pytest.fixture(scope="module")
def native(models_dir, cifar_tarball, tmp_path_factory) -> Path:
    """The float file and its twins, all made on this machine's CPU."""
    folder = tmp_path_factory.mktemp("native")
    shutil.copy(models_dir / f"{MODEL}.onnx", folder)
    data = load(cifar_tarball, val_size=VAL_SIZE)
    quantize.export_int8(folder / f"{MODEL}.onnx", folder / f"{MODEL}-int8.onnx", data)
    float16.export_float16(folder / f"{MODEL}.onnx", folder / f"{MODEL}-float16.onnx", data)
    return folder


@pytest.fixture(scope="module")
def emulated(qemu, native, cifar_tarball, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("emulated")
    command = [qemu, "-cpu", EMULATED_CPU, sys.executable, "-c", EMULATED, str(native), str(out),
               str(cifar_tarball), str(VAL_SIZE)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), out


def test_the_emulated_cpu_is_avx2_without_avx512_or_vnni(emulated):
    result, _ = emulated
    assert result["cpu"]["cpu_flags"] == ["avx2"], result["cpu"]
    assert result["cpu"]["int8_kernels"] == "AVX2 (no VNNI)"


def test_files_made_on_this_cpu_keep_their_promise_on_avx2(emulated, native):
    result, _ = emulated
    names = sorted(path.name for path in native.glob("*.onnx"))
    assert names == [f"{MODEL}-float16.onnx", f"{MODEL}-int8.onnx", f"{MODEL}.onnx"]
    assert result["loaded"] == dict.fromkeys(names, "ok"), (cpu(), result["loaded"])


def test_familiarity_calibration_holds_on_avx2(emulated):
    """Each validation image's rank as at export, give or take float32 rounding against
    its stored distance (the bound the native test holds too)."""
    assert emulated[0]["familiarity_rank_error"] <= 2


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_twins_made_on_avx2_pass_their_gates_and_serve_here(emulated, precision):
    result, out = emulated
    evaluation = result["exported"][precision]
    assert isinstance(evaluation, dict), evaluation  # else the gate's refusal, in words
    assert evaluation["images"] == 500
    if precision == "int8":
        kept = round(evaluation["top1_accuracy"] * 500)
        assert round(evaluation["float32_top1_accuracy"] * 500) - kept <= 5  # 1 point
        assert evaluation["familiarity_mean_abs_difference"] <= 0.05
    model = Classifier(out / f"{MODEL}-{precision}.onnx", "cpu", 1, 1, max_batch_size=8)
    model.warm_up()  # its self-check, made under emulation, on this CPU
    assert model.ready
