"""What the machine can do: the device to train and encode on, the CPU's /proc/cpuinfo fields and the ISA features
that decide bf16 and int8 paths."""
from __future__ import annotations

from pathlib import Path


def best_device() -> str:
    """Where training and encoding run: "cuda" when a CUDA GPU is present, else "mps" (Apple silicon), else "cpu"."""
    import torch  # here, not at the top: what imports lib.cpu without needing torch stays quick to start

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpuinfo_field(name: str) -> str:
    """The first value of a field ("flags", "model name") in /proc/cpuinfo; "" where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.split(":")[0].strip() == name), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none), without the AVX-512 and AMX ones when
    torch is held below AVX-512 (`ATEN_CPU_CAPABILITY=avx2`, how an AVX-512 machine imitates an AVX2 laptop)."""
    import torch

    flags = set(cpuinfo_field("flags").split())
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    return flags


def bf16_supported(flags: set[str] | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); elsewhere bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))


def has_vnni(flags: set[str] | None = None) -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & (cpu_flags() if flags is None else flags))
