"""The machine a benchmark ran on, described once for every mode's results."""

import contextlib
import os
import platform
from pathlib import Path

import onnxruntime as ort

from service.config import Settings, available_cpus

CPU_FLAGS = (
    "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
    "amx_bf16", "amx_int8",
)  # fmt: skip
# What onnxruntime's int8 kernels (MLAS) can use, best first: /proc/cpuinfo flags -> name.
INT8_KERNELS = (
    (("amx_int8", "amx_tile"), "AMX"),
    (("avx512_vnni",), "AVX-512 VNNI"),
    (("avx_vnni",), "AVX-VNNI"),
    (("avx512bw",), "AVX-512 (no VNNI)"),
    (("avx2",), "AVX2 (no VNNI)"),
)


def int8_kernels(flags: list[str] | set[str]) -> str:
    """The widest int8 dot-product instructions `flags` offer (onnxruntime's MLAS has a
    kernel for each of INT8_KERNELS and picks the widest at start)."""
    for needs, name in INT8_KERNELS:
        if set(needs) <= set(flags):
            return name
    return "none of AVX2/AVX-512/AMX"


def describe_machine(settings: Settings) -> dict:
    """CPU, its vector extensions, CPUs available, onnxruntime and the service's thread
    split under `settings`, and the load average now."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "int8_kernels": int8_kernels(flags),
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
    flags = ", ".join(m["cpu_flags"]) or "none of " + "/".join(CPU_FLAGS[:2])
    load = "/".join(f"{x:.2f}" for x in m["load_average_start"][:1] + m.get(
        "load_average_end", [float("nan")])[:1])  # fmt: skip
    int8 = f"; int8 kernels: {m['int8_kernels']}" if m.get("int8_kernels") else ""
    return (
        f"Machine: {m['cpu']} ({flags}{int8}), {m['cpus_available']} CPUs available "
        f"({m['cores']} cores), onnxruntime {m['onnxruntime']}, Python {m['python']}; service: "
        f"{m['workers']} worker(s) x {m['onnx_threads']} onnxruntime thread(s); load generator "
        f"on the same CPUs; 1-minute load average at start/end {load}."
    )
