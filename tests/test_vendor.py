"""The pinned source, the patch series and the incremental build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENDOR = [sys.executable, str(REPO / "scripts" / "vendor.py")]


def vendor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VENDOR, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def test_nothing_changed_means_nothing_to_do():
    res = vendor("build")
    assert res.returncode == 0, res.stderr
    assert "patches up to date" in res.stderr
    assert res.stderr.count("ninja: no work to do.") == 2, res.stderr


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
        "@@ -1,1 +1,1 @@\n-this line is not in llama.cpp's README\n+replacement\n")
    env = {"KVGGML_PATCHES_DIR": str(patches), "KVGGML_PATCHED_SRC": str(tmp_path / "llama.cpp")}
    res = vendor("apply-patches", env=env)
    assert res.returncode == 1
    assert "patch 0001-broken.patch does not apply to llama.cpp 0.3.36" in res.stderr
    # the failed series is not taken for a finished one
    again = vendor("apply-patches", env=env)
    assert again.returncode == 1 and "does not apply" in again.stderr
