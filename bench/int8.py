"""The int8 model measured beside the float one: which file, and where it comes from.

`<id>-int8.onnx` next to the float file in the models folder is used as it is; with
`--int8 quantize` a model without one is quantized here from the float file being
measured (training.quantize.quantize_int8, calibrated on synthetic real-looking images:
an untrained file is as fast as a trained one, as for the float exports).
"""

from pathlib import Path

from bench.load import pixel_images
from bench.modelfiles import copy_verified

CALIBRATION_IMAGES = 256
MODES = ("auto", "quantize", "off")  # auto: only a file that exists


def int8_name(model_id: str) -> str:
    return f"{model_id}-int8.onnx"


def int8_file(
    models_dir: Path, work: Path, model_id: str, float_file: Path, mode: str
) -> tuple[Path, str] | None:
    """The int8 file to measure for `model_id`, alone in a folder under `work` (the
    service serves every file of its folder): (path, where it came from), or None."""
    if mode == "off":
        return None
    beside = Path(models_dir) / int8_name(model_id)
    folder = work / f"{model_id}-int8"
    target = folder / int8_name(model_id)
    if beside.exists():
        folder.mkdir(parents=True, exist_ok=True)
        copy_verified(beside, target)
        return target, f"int8, {beside.name} from the models folder"
    if mode != "quantize":
        return None
    from training.quantize import quantize_int8  # imported only when asked for

    folder.mkdir(parents=True, exist_ok=True)
    quantize_int8(float_file, target, pixel_images(CALIBRATION_IMAGES, seed=2))
    return target, (
        f"int8, quantized here from the float file measured (calibrated on "
        f"{CALIBRATION_IMAGES} synthetic images; speed only)"
    )
