"""cffi bindings (ABI mode) to kvggml's C API in the patched libllama.

The functions live in the same libllama that llama-cpp-python loaded (the dynamic
loader hands back that library), so a `llama_context *` from llama_cpp is passed
straight through. With the stock library every entry point is missing and
`open_library` raises a clear error.
"""

from __future__ import annotations

from types import ModuleType

from cffi import FFI

from kvggml.library import loaded_library_path

# From kvggml/csrc/include/kvggml.h; tests/test_native.py checks the two agree.
CDEF = """
const char * kvggml_version_string(void);
unsigned     kvggml_version_number(void);
const char * kvggml_error_name(int32_t code);

typedef struct kvggml_stats {
    int32_t  enabled;
    uint32_t exact_cells;
    uint64_t exact_bytes;
    uint64_t compressed_bytes;
    uint64_t compressed_tokens;
    uint64_t blocks;
    uint64_t encode_us;
    uint64_t decode_us;
} kvggml_stats;
int32_t kvggml_get_stats(const void * ctx, kvggml_stats * out);
"""

ffi = FFI()
ffi.cdef(CDEF)
_lib = None


def open_library():
    """kvggml's functions in the libllama this process loaded (llama_cpp must be imported first)."""
    global _lib
    if _lib is None:
        path = loaded_library_path()
        if path is None:
            raise RuntimeError("load llama_cpp first (kvggml.library.load_llama_cpp)")
        lib = ffi.dlopen(str(path))
        try:
            lib.kvggml_version_string
        except AttributeError:
            raise RuntimeError(f"{path} is stock llama.cpp: kvggml's API needs the patched library "
                               "(KVGGML_LIB=patched)") from None
        _lib = lib
    return _lib


def get_stats(ctx) -> dict:
    """Totals of a context's KV cache: exact and compressed bytes, blocks, time spent.

    ctx: a `llama_context *` as llama_cpp gives it (an address, or a ctypes c_void_p).
    """
    lib = open_library()
    out = ffi.new("kvggml_stats *")
    address = getattr(ctx, "value", ctx)
    if not address:
        raise ValueError("ctx is a null llama_context pointer")
    rc = lib.kvggml_get_stats(ffi.cast("void *", address), out)
    if rc != 0:
        raise RuntimeError(f"kvggml_get_stats failed: {ffi.string(lib.kvggml_error_name(rc)).decode()}")
    return {name: int(getattr(out, name)) for name, _ in ffi.typeof("kvggml_stats").fields}


def stats_or_none(llama_cpp: ModuleType, ctx: int) -> dict | None:
    """get_stats on the patched library, None on stock llama.cpp."""
    from kvggml.library import kvggml_version

    return get_stats(ctx) if kvggml_version(llama_cpp.llama_cpp._lib) else None
