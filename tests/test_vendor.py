"""The pinned source, the patch series and the incremental build."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvggml.cpu import cmake_cache

REPO = Path(__file__).resolve().parent.parent
VENDOR = [sys.executable, str(REPO / "scripts" / "vendor.py")]
_spec = importlib.util.spec_from_file_location("vendor", REPO / "scripts" / "vendor.py")
vendor_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vendor_module)


def vendor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VENDOR, *args], capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )


def test_no_llama_cpp_source_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.startswith(("ggml/", "src/", "vendor/llama.cpp/"))]


def test_patches_are_byte_stable_on_export(tmp_path):
    before = {p.name: p.read_bytes() for p in (REPO / "patches").glob("*.patch")}
    res = vendor("format-patches", env={"KVGGML_PATCHES_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.patch")} == before


def test_a_patch_that_does_not_apply_names_itself(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-broken.patch").write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: test <test@localhost>\nDate: Thu, 1 Jan 2026 00:00:00 +0000\nSubject: [PATCH] broken\n\n---\n"
        "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
        "@@ -1,1 +1,1 @@\n-this line is not in llama.cpp's README\n+replacement\n"
    )
    env = {"KVGGML_PATCHES_DIR": str(patches), "KVGGML_PATCHED_SRC": str(tmp_path / "llama.cpp")}
    res = vendor("apply-patches", env=env)
    assert res.returncode == 1
    assert "patch 0001-broken.patch does not apply to llama.cpp 0.3.36" in res.stderr
    # the failed series is not taken for a finished one
    again = vendor("apply-patches", env=env)
    assert again.returncode == 1 and "does not apply" in again.stderr


def test_nothing_changed_means_nothing_to_do():
    res = vendor("build")
    assert res.returncode == 0, res.stderr
    assert "patches up to date" in res.stderr
    assert "configuring" not in res.stderr
    # llama-server's UI step is a target ninja always runs; nothing may be compiled or linked
    assert not re.search(r"\] (Building|Linking) ", res.stderr), res.stderr
    assert "ninja: no work to do." in res.stderr, res.stderr


# --- AMX: ggml's AMX kernels crash stock and patched alike on AMX CPUs (llama.cpp #20824)

AMX_MACROS = ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__")
AMX_INSTRUCTIONS = re.compile(
    r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tdpb[su][su]d|tdpbf16ps)\b"
)


@pytest.mark.skipif(not vendor_module.X86, reason="AMX is x86 only")
@pytest.mark.parametrize("variant", ["stock", "patched"])
def test_both_builds_are_configured_without_amx(variant):
    cache = cmake_cache(REPO / "build" / variant)
    for lang in ("C", "CXX"):
        assert set(vendor_module.NO_AMX_FLAGS) <= set(cache[f"CMAKE_{lang}_FLAGS"].split()), cache[
            f"CMAKE_{lang}_FLAGS"
        ]


def predefined_macros(compiler: str, *flags: str) -> set[str]:
    res = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", "-"], input="", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return {line.split()[1] for line in res.stdout.splitlines()}


@pytest.mark.skipif(not vendor_module.X86, reason="AMX is x86 only")
@pytest.mark.parametrize("variant", ["stock", "patched"])
def test_the_build_flags_turn_amx_off_on_an_amx_cpu(variant):
    # Whatever this machine's CPU: -march=sapphirerapids is what -march=native gives on an AMX one.
    compiler = cmake_cache(REPO / "build" / variant)["CMAKE_C_COMPILER"]
    assert set(AMX_MACROS) <= predefined_macros(compiler, "-march=sapphirerapids")
    flags = cmake_cache(REPO / "build" / variant)["CMAKE_C_FLAGS"].split()
    # CMake puts CMAKE_C_FLAGS before ggml's -march=native; either order must do
    assert not set(AMX_MACROS) & predefined_macros(compiler, *flags, "-march=sapphirerapids")
    assert not set(AMX_MACROS) & predefined_macros(compiler, "-march=sapphirerapids", *flags)


@pytest.mark.parametrize("variant", ["stock", "patched"])
def test_the_built_libraries_hold_no_amx_instruction(variant):
    libraries = sorted((REPO / "build" / variant / "bin").glob("libggml*.so"))
    assert libraries
    for library in libraries:
        disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        assert not AMX_INSTRUCTIONS.search(disassembly), (
            f"{library.name}: {AMX_INSTRUCTIONS.search(disassembly).group(0)}"
        )


# --- build identity: options and compilers decide whether a tree is reconfigured


@pytest.fixture
def tiny_project(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(tiny C)\n"
        'option(TINY_OPTION "a test option" OFF)\nadd_library(tiny tiny.c)\n'
    )
    (src / "tiny.c").write_text("int tiny(void) { return 1; }\n")
    return src, tmp_path / "out"


@pytest.mark.fast
def test_an_unchanged_identity_does_not_reconfigure(tiny_project):
    src, out = tiny_project
    env = dict(os.environ)
    assert vendor_module.configure(src, out, ["-G", "Ninja", "-DTINY_OPTION=ON"], env)
    cache = (out / "CMakeCache.txt").stat().st_mtime_ns
    assert not vendor_module.configure(src, out, ["-G", "Ninja", "-DTINY_OPTION=ON"], env)
    assert (out / "CMakeCache.txt").stat().st_mtime_ns == cache


@pytest.mark.fast
def test_a_changed_option_reconfigures_from_an_empty_cache(tiny_project):
    src, out = tiny_project
    env = dict(os.environ)
    vendor_module.configure(src, out, ["-G", "Ninja", "-DTINY_OPTION=ON", "-DCMAKE_C_FLAGS=-DFOO"], env)
    assert "TINY_OPTION:BOOL=ON" in (out / "CMakeCache.txt").read_text()
    # an option dropped must not survive in the cache either
    assert vendor_module.configure(src, out, ["-G", "Ninja"], env)
    text = (out / "CMakeCache.txt").read_text()
    assert "TINY_OPTION:BOOL=OFF" in text and "-DFOO" not in text


@pytest.mark.fast
def test_a_changed_compiler_reconfigures(tiny_project, tmp_path):
    src, out = tiny_project
    env = dict(os.environ)
    vendor_module.configure(src, out, ["-G", "Ninja"], env)
    wrapper = tmp_path / "my-cc"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("cc")} "$@"\n')
    wrapper.chmod(0o755)
    assert vendor_module.configure(src, out, ["-G", "Ninja"], {**env, "CC": str(wrapper)})
    assert f"CMAKE_C_COMPILER:FILEPATH={wrapper}" in (out / "CMakeCache.txt").read_text()
    assert not vendor_module.configure(src, out, ["-G", "Ninja"], {**env, "CC": str(wrapper)})


@pytest.mark.fast
def test_an_unknown_variant_names_the_known_ones():
    res = vendor("build", "debug")
    assert res.returncode == 2
    assert "build: unknown variant 'debug': expected one of stock, patched, sanitize" in res.stderr
