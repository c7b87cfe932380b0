"""What this machine computes with: the CPU, the vector extensions the engines' kernels
choose between, and the kernel class each precision takes. A measurement names these,
since the same file takes other code paths on another CPU."""

import contextlib
import platform
from functools import cache
from pathlib import Path

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


# float32 (and float16 files, which the CPU computes in float32) and bfloat16, best first.
FLOAT_KERNELS = ((("avx512f",), "AVX-512"), (("avx2",), "AVX2"))
BFLOAT16_KERNELS = ((("amx_bf16", "amx_tile"), "AMX"), (("avx512_bf16",), "AVX-512 BF16"))


def int8_kernels(flags: list[str] | set[str]) -> str:
    """The widest int8 dot-product instructions `flags` offer (onnxruntime's MLAS has a
    kernel for each of INT8_KERNELS and picks the widest at start)."""
    return _widest(INT8_KERNELS, flags) or "none of AVX2/AVX-512/AMX"


def kernels(precision: str, flags: list[str] | set[str]) -> str | None:
    """The instructions a CPU computes `precision` with, by its `flags`; None where it has
    none for it (bfloat16 without AMX or AVX-512 BF16)."""
    if precision == "int8":
        return int8_kernels(flags)
    if precision == "bfloat16":
        return _widest(BFLOAT16_KERNELS, flags)
    return _widest(FLOAT_KERNELS, flags) or "SSE"


def _widest(table: tuple, flags: list[str] | set[str]) -> str | None:
    for needs, name in table:
        if set(needs) <= set(flags):
            return name
    return None


# /proc/cpuinfo flags -> NumPy's name for the same CPUID bit. NumPy asks CPUID itself, as
# onnxruntime does; /proc/cpuinfo describes the host even under an emulator (qemu-user).
CPUID_NAMES = {
    "avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16",
}  # fmt: skip


@cache
def cpu() -> dict[str, object]:
    """{"cpu": model name, "cpu_flags": the CPU_FLAGS it has, "int8_kernels": ...}: what
    onnxruntime's kernels will find. Where CPUID denies a flag that /proc/cpuinfo lists
    (an emulated CPU such as `qemu-x86_64 -cpu Haswell`), CPUID wins, and the extensions
    NumPy cannot ask about (AMX, AVX-VNNI) are not claimed."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    seen = _cpuid_features()
    denied = {flag for flag, name in CPUID_NAMES.items() if flag in flags and not seen.get(name)}
    if seen and denied:
        flags -= denied | {"amx_tile", "amx_bf16", "amx_int8", "avx_vnni"}
        model = f"emulated CPU without {', '.join(sorted(denied))} (host: {model})"
    return {
        "cpu": model,
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "int8_kernels": int8_kernels(flags),
    }


def _cpuid_features() -> dict[str, bool]:
    """NumPy's reading of CPUID at import (empty where this NumPy does not expose it)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return {}
    return dict(__cpu_features__)
