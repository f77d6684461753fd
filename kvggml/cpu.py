"""The CPU features in play: what this CPU has, what the loaded llama.cpp build was compiled
for, and which kernels kvggml's codec picked, for `kvggml info`."""

from __future__ import annotations

import platform
from pathlib import Path
from types import ModuleType

# The /proc/cpuinfo flags that decide which kernels ggml and the codec can use.
FLAGS_OF_INTEREST = (
    "avx",
    "avx2",
    "f16c",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """Model name and the flags of interest this CPU reports (Linux; elsewhere the machine name only)."""
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "flags": [f for f in FLAGS_OF_INTEREST if f in flags]}


def build_features(llama_cpp: ModuleType) -> list[str]:
    """The features ggml's CPU backend was compiled with (llama_print_system_info: "AVX2 = 1 | ...")."""
    info = llama_cpp.llama_print_system_info().decode()  # backends as "CPU : SSE3 = 1 | AVX = 1 | ..."
    features = []
    for part in info.split("|"):
        name, _, on = part.partition("=")
        name = name.rpartition(":")[2].strip()
        if name and on.strip() == "1":
            features.append(name)
    return features


def cmake_cache(build_tree: Path) -> dict[str, str]:
    """The entries of a build tree's CMakeCache.txt, by name (empty when there is none)."""
    cache = build_tree / "CMakeCache.txt"
    if not cache.is_file():
        return {}
    entries = (line.split("=", 1) for line in cache.read_text().splitlines() if "=" in line and line[0] not in "#/")
    return {key.partition(":")[0]: value for key, value in entries}


def report(llama_cpp: ModuleType, bin_dir: Path, patched: bool) -> dict:
    """Host CPU, build features and flags, and the codec's kernels (patched library only)."""
    out = {
        "host": host_cpu(),
        "build_features": build_features(llama_cpp),
        "build_c_flags": cmake_cache(bin_dir.parent).get("CMAKE_C_FLAGS"),
        "codec_kernels": None,
    }
    if patched:
        from kvggml import native

        out["codec_kernels"] = native.ffi.string(native.open_library().kvggml_codec_kernels()).decode()
    return out
