"""The machine a benchmark ran on, described once for every mode's results."""

import os
import platform

import onnxruntime as ort

from contract import engines, hardware
from service.config import Settings, available_cpus


def describe_machine(settings: Settings) -> dict:
    """CPU, its vector extensions and the kernels each precision takes there, CPUs
    available, the engines' versions (and what OpenVINO says the CPU computes), the
    service's thread split under `settings`, and the load average now."""
    cpu = hardware.cpu()
    openvino = engines.openvino_version()
    return {
        **cpu,
        "bfloat16_kernels": hardware.kernels("bfloat16", cpu["cpu_flags"]),
        "openvino": openvino,
        "openvino_capabilities": engines.openvino_capabilities() if openvino else [],
        "cores": os.cpu_count(),
        "cpus_available": available_cpus(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def machine_line(m: dict) -> str:
    """`describe_machine`'s dict (with `load_average_end` when known) as one sentence."""
    flags = ", ".join(m["cpu_flags"]) or "none of " + "/".join(hardware.CPU_FLAGS[:2])
    load = "/".join(f"{x:.2f}" for x in m["load_average_start"][:1] + m.get(
        "load_average_end", [float("nan")])[:1])  # fmt: skip
    int8 = f"; int8 kernels: {m['int8_kernels']}" if m.get("int8_kernels") else ""
    bfloat16 = f"; bfloat16: {m.get('bfloat16_kernels') or 'none'}" if "openvino" in m else ""
    openvino = (f", OpenVINO {m['openvino']} ({', '.join(m['openvino_capabilities'])})"
                if m.get("openvino") else "")  # fmt: skip
    return (
        f"Machine: {m['cpu']} ({flags}{int8}{bfloat16}), {m['cpus_available']} CPUs available "
        f"({m['cores']} cores), onnxruntime {m['onnxruntime']}{openvino}, Python {m['python']}; "
        "service: "
        f"{m['workers']} worker(s) x {m['onnx_threads']} engine thread(s); load generator "
        f"on the same CPUs; 1-minute load average at start/end {load}."
    )
