"""Stock and patched libllama, each in its own process, on the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import child_env, last_json, run_script

from kvggml.library import library_dir


@pytest.fixture(scope="module")
def runs():
    return {
        variant: last_json(run_script("generate", env=child_env(variant), timeout=300))
        for variant in ("stock", "patched")
    }


def test_each_process_loads_the_library_it_asked_for(runs):
    for variant, run in runs.items():
        assert Path(run["library"]) == library_dir(variant) / "libllama.so"


def test_our_symbol_is_in_the_patched_library_only(runs):
    from kvggml import __version__

    assert runs["stock"]["kvggml"] is None
    assert runs["patched"]["kvggml"] == __version__


def test_both_generate_the_same_text_with_compression_off(runs):
    assert len(runs["stock"]["text"].split()) >= 3
    assert runs["patched"]["text"] == runs["stock"]["text"]


def test_a_second_library_in_one_process_is_refused(llama_cpp):
    from kvggml.library import load_llama_cpp

    with pytest.raises(RuntimeError, match="already loaded from .*start a new process"):
        load_llama_cpp({"KVGGML_LIB": "patched"})


def test_missing_build_is_a_clear_error(tmp_path):
    res = run_script("load_library", env=child_env(KVGGML_BUILD_DIR=str(tmp_path)), timeout=60)
    assert f"patched libllama not found at {tmp_path}/patched/bin/libllama.so: run `make build`" in res.stdout
