"""Shared fixtures and helpers: the real default model, and the processes tests start.

One process can load one libllama. The pytest process holds the stock library (the
`llama_cpp` fixture); tests that need the patched library, or their own environment, run a
program of tests/scripts/ in a process of their own (`run_script`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvggml.library import SANITIZER_OPTIONS

SCRIPTS = Path(__file__).resolve().parent / "scripts"


# `make sanitize` sets KVGGML_TEST_PATCHED=sanitize (`make tsan`: tsan): children that ask for the patched
# library get the sanitized build, with the sanitizer runtimes loaded first (Python itself is not built with them).
PATCHED = os.environ.get("KVGGML_TEST_PATCHED", "patched")


@functools.cache
def sanitizer_env() -> dict[str, str]:
    runtimes = [
        subprocess.run(["cc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
        for name in ("libasan.so", "libubsan.so")
    ]
    return {"LD_PRELOAD": " ".join(runtimes), **SANITIZER_OPTIONS}


@functools.cache
def tsan_env() -> dict[str, str]:
    """`make tsan` (KVGGML_TEST_PATCHED=tsan): the ThreadSanitizer runtime loaded first; any report
    makes the child exit with 66, so its test fails and shows the report."""
    runtime = subprocess.run(["cc", "-print-file-name=libtsan.so"], capture_output=True, text=True, check=True)
    return {"LD_PRELOAD": runtime.stdout.strip(), "TSAN_OPTIONS": "exitcode=66:second_deadlock_stack=1"}


def child_env(lib: str = "patched", **variables: str) -> dict[str, str]:
    """A child process's environment: this one's, less any compression setting or library path
    the shell had, with KVGGML_LIB=lib (the library under test for "patched") and the given variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_KV_COMPRESSION")}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    lib = PATCHED if lib == "patched" else lib
    runtimes = sanitizer_env() if lib == "sanitize" else tsan_env() if lib == "tsan" else {}
    return {**env, **runtimes, "KVGGML_LIB": lib, **variables}


def run_script(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """tests/scripts/<name>.py with args, in child_env() unless env is given."""
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def last_json(res: subprocess.CompletedProcess) -> dict:
    """The JSON report a script prints as its last line."""
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`kvggml ARGS` in a process of its own, in child_env() unless env is given."""
    return subprocess.run(
        [sys.executable, "-m", "kvggml.cli", *args],
        env=env or child_env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def llama_cpp():
    from kvggml.library import load_llama_cpp
    from kvggml.model import silence_llama_logs

    module = load_llama_cpp({**os.environ, "KVGGML_LIB": "stock"})
    silence_llama_logs(module)
    return module


@pytest.fixture(scope="session")
def model_path():
    from kvggml.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def text():
    from kvggml.model import default_text

    return default_text()
