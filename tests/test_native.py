"""kvggml.native's cffi declarations against kvggml.h as a C compiler reads it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PATCHED, child_env, last_json, run_script

from kvggml import native
from kvggml.library import library_dir

STRUCTS = ("kvggml_codec_params", "kvggml_stats", "kvggml_segment", "kvggml_event", "kvggml_settings")


@pytest.mark.fast
def test_every_exported_function_is_declared():
    exported = re.findall(r"KVGGML_API\s+[^;(]*?\b(kvggml_\w+)\s*\(", native.HEADER_TEXT)
    cdef = native.header_cdef(native.HEADER_TEXT)
    assert len(exported) >= 15
    assert all(re.search(rf"\b{name}\s*\(", cdef) for name in exported)
    assert not re.search(r"#|//|KVGGML_API|extern", cdef)


@pytest.mark.fast
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_struct_sizes_and_offsets_match_the_compiled_header(tmp_path):
    lines = []
    for struct in STRUCTS:
        lines.append(f'printf("{struct} %zu\\n", sizeof({struct}));')
        for field, _ in native.ffi.typeof(struct).fields:
            lines.append(f'printf("{struct}.{field} %zu\\n", offsetof({struct}, {field}));')
    source = tmp_path / "layout.c"
    source.write_text(
        '#include <stddef.h>\n#include <stdio.h>\n#include "kvggml.h"\nint main(void) {\n'
        + "\n".join(lines)
        + "\nreturn 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", str(native.HEADER.parent), str(source), "-o", str(exe)], check=True)
    compiled = dict(
        line.rsplit(" ", 1)
        for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    )
    for struct in STRUCTS:
        assert int(compiled[struct]) == native.ffi.sizeof(struct), struct
        for field, _ in native.ffi.typeof(struct).fields:
            assert int(compiled[f"{struct}.{field}"]) == native.ffi.offsetof(struct, field), f"{struct}.{field}"


@pytest.mark.fast
@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_the_header_compiles_as_cpp_with_its_string_helper(tmp_path):
    # llama-server (patch 0003) includes it and calls kvggml_format_string
    source = tmp_path / "host.cpp"
    source.write_text(
        '#include "kvggml.h"\n'
        "std::string line(const llama_context * ctx) { return kvggml_format_string(kvggml_format_sequence, ctx, 0); }\n"
    )
    res = subprocess.run(
        ["c++", "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", str(native.HEADER.parent), str(source)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.fast
def test_the_header_version_is_the_package_version():
    from kvggml import __version__

    major, minor, patch = map(int, __version__.split("."))
    assert native.VERSION_NUMBER == major * 10000 + minor * 100 + patch


def test_a_library_of_another_version_is_refused():
    res = run_script("open_api", "ahead", timeout=120)
    assert re.search(
        r"libllama\.so was built from kvggml \d+\.\d+\.\d+ \(\d+\), but this package's kvggml\.h is "
        r"\d+: rebuild it with `make build`",
        res.stdout,
    ), res.stdout
    assert run_script("open_api", timeout=120).stdout.strip() == "opened"


def test_the_stock_library_has_no_api():
    res = run_script("open_api", env=child_env("stock"), timeout=120)
    assert "libllama.so is stock llama.cpp: kvggml's API needs the patched library (KVGGML_LIB=patched)" in res.stdout


def test_children_run_the_library_under_test():
    # under `make sanitize` every child asking for the patched library runs the sanitized build
    out = last_json(run_script("generate", timeout=300))
    assert Path(out["library"]) == library_dir(PATCHED) / "libllama.so"
    assert out["asan_loaded"] == (PATCHED == "sanitize")
