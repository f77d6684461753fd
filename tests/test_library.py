"""Stock and patched libllama, each in its own process, on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvggml.library import library_dir

GENERATE = """
import json
from kvggml.library import kvggml_version, load_llama_cpp, loaded_library_path
from kvggml.model import default_model_path
llama_cpp = load_llama_cpp()
llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("The three primary colors are", max_tokens=12, temperature=0.0)
print(json.dumps({"text": out["choices"][0]["text"], "library": str(loaded_library_path()),
                  "kvggml": kvggml_version(llama_cpp.llama_cpp._lib)}))
"""


def run_with(variant: str) -> dict:
    env = {**os.environ, "KVGGML_LIB": variant}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    res = subprocess.run([sys.executable, "-c", GENERATE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return {variant: run_with(variant) for variant in ("stock", "patched")}


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
    code = ("from kvggml.library import load_llama_cpp\n"
            "try:\n    load_llama_cpp()\nexcept FileNotFoundError as e:\n    print(e)\n")
    env = {**os.environ, "KVGGML_BUILD_DIR": str(tmp_path), "KVGGML_LIB": "patched"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"patched libllama not found at {tmp_path}/patched/bin/libllama.so: run `make build`" in res.stdout
