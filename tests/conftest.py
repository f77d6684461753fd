"""Shared fixtures: the real default model, on the stock library, in this process.

One process can load one libllama; tests that need the patched library, or both,
start their own processes (see test_library.py).
"""

from __future__ import annotations

import os

import pytest


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
