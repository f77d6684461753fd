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

# From kvggml/csrc/include/kvggml.h; tests/test_tier.py checks the structs agree.
CDEF = """
const char * kvggml_version_string(void);
unsigned     kvggml_version_number(void);
const char * kvggml_error_name(int32_t code);
const char * kvggml_last_error(void);

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

typedef struct kvggml_segment {
    int32_t  seq_id;
    int32_t  p0;
    int32_t  p1;
    int32_t  level;
    uint32_t n_tokens;
    uint64_t bytes;
} kvggml_segment;
int64_t kvggml_get_segments(const void * ctx, int32_t seq_id, kvggml_segment * out, size_t capacity);
int64_t kvggml_get_bitmap(const void * ctx, int32_t seq_id, uint8_t * bits, size_t n_bytes);

typedef struct kvggml_event {
    int32_t  seq_id;
    int32_t  p0;
    int32_t  p1;
    int32_t  level;
    uint64_t bytes_before;
    uint64_t bytes_after;
} kvggml_event;
typedef void (*kvggml_compress_callback)(const kvggml_event * event, void * user_data);
int32_t kvggml_set_compress_callback(void * ctx, kvggml_compress_callback callback, void * user_data);

typedef struct kvggml_settings {
    uint32_t threshold;
    uint32_t sinks;
    uint32_t level;
    uint32_t recent_capacity;
    char     preset[16];
} kvggml_settings;
int32_t kvggml_get_settings(const void * ctx, kvggml_settings * out);
int32_t kvggml_set_settings(void * ctx, const kvggml_settings * settings);
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


def _pointer(ctx):
    address = getattr(ctx, "value", ctx)
    if not address:
        raise ValueError("ctx is a null llama_context pointer")
    return ffi.cast("void *", address)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        lib = open_library()
        detail = ffi.string(lib.kvggml_last_error()).decode() or ffi.string(lib.kvggml_error_name(rc)).decode()
        raise RuntimeError(f"{what} failed: {detail}")
    return rc


def _as_dict(record, ctype: str) -> dict:
    return {name: ffi.string(value).decode() if field.type.kind == "array" else int(value)
            for name, field in ffi.typeof(ctype).fields for value in [getattr(record, name)]}


def get_segments(ctx, seq_id: int = -1) -> list[dict]:
    """Compressed blocks of one sequence (-1: all), in position order: seq_id, p0, p1, level, n_tokens, bytes."""
    lib = open_library()
    n = _check(lib.kvggml_get_segments(_pointer(ctx), seq_id, ffi.NULL, 0), "kvggml_get_segments")
    out = ffi.new("kvggml_segment[]", max(n, 1))
    n = _check(lib.kvggml_get_segments(_pointer(ctx), seq_id, out, n), "kvggml_get_segments")
    return [_as_dict(out[i], "kvggml_segment") for i in range(n)]


def get_bitmap(ctx, seq_id: int) -> list[bool]:
    """One flag per block slot of the sequence (after the sinks): compressed or not."""
    lib = open_library()
    n_bits = _check(lib.kvggml_get_bitmap(_pointer(ctx), seq_id, ffi.NULL, 0), "kvggml_get_bitmap")
    bits = ffi.new("uint8_t[]", max((n_bits + 7) // 8, 1))
    _check(lib.kvggml_get_bitmap(_pointer(ctx), seq_id, bits, len(bits)), "kvggml_get_bitmap")
    return [bool(bits[k // 8] >> (k % 8) & 1) for k in range(n_bits)]


class CompressCallback:
    """Calls fn(event: dict) for every block the context compresses, on the thread running llama_decode.

    An exception raised by fn is printed to stderr and kept in `.errors`; it never reaches
    llama.cpp, and decoding goes on. Keep this object alive while the context uses it;
    `close()` unregisters it.
    """

    def __init__(self, ctx, fn):
        self.ctx, self.fn, self.errors = ctx, fn, []

        def report(exc_type, exc, tb):
            import traceback

            self.errors.append(exc)
            traceback.print_exception(exc_type, exc, tb)

        self._c_fn = ffi.callback("kvggml_compress_callback", self._call, onerror=report)
        _check(open_library().kvggml_set_compress_callback(_pointer(ctx), self._c_fn, ffi.NULL),
               "kvggml_set_compress_callback")

    def _call(self, event, user_data):  # noqa: ARG002
        self.fn(_as_dict(event, "kvggml_event"))

    def close(self) -> None:
        open_library().kvggml_set_compress_callback(_pointer(self.ctx), ffi.NULL, ffi.NULL)


def get_stats(ctx) -> dict:
    """Totals of a context's KV cache: exact and compressed bytes, blocks, time spent.

    ctx: a `llama_context *` as llama_cpp gives it (an address, or a ctypes c_void_p).
    """
    out = ffi.new("kvggml_stats *")
    _check(open_library().kvggml_get_stats(_pointer(ctx), out), "kvggml_get_stats")
    return _as_dict(out, "kvggml_stats")


def get_settings(ctx) -> dict:
    """threshold, sinks, level, recent_capacity, preset of a context that compresses."""
    out = ffi.new("kvggml_settings *")
    _check(open_library().kvggml_get_settings(_pointer(ctx), out), "kvggml_get_settings")
    return _as_dict(out, "kvggml_settings")


def set_settings(ctx, **changes) -> dict:
    """Change threshold, sinks and/or preset from the next decode on; returns the new settings.

    A value out of range raises ValueError naming it and the allowed range; nothing changes then.
    """
    current = get_settings(ctx)
    unknown = set(changes) - set(current)
    if unknown:
        raise ValueError(f"no setting {', '.join(sorted(unknown))}: the settings are {', '.join(current)}")
    new = {**current, **changes}
    settings = ffi.new("kvggml_settings *")
    for name in ("threshold", "sinks", "level", "recent_capacity"):
        value = new[name]
        if not isinstance(value, int) or not 0 <= value < 2**32:
            raise ValueError(f"{name}={value!r} is out of range: expected an integer from 0 to {2**32 - 1}")
        setattr(settings, name, value)
    preset = str(new["preset"]).encode()
    if len(preset) >= len(settings.preset):
        raise ValueError(f"preset={new['preset']!r} is not allowed: expected one of hi, balanced, lo")
    settings.preset = preset
    lib = open_library()
    if lib.kvggml_set_settings(_pointer(ctx), settings) < 0:
        raise ValueError(ffi.string(lib.kvggml_last_error()).decode())
    return get_settings(ctx)


def stats_or_none(llama_cpp: ModuleType, ctx: int) -> dict | None:
    """get_stats on the patched library, None on stock llama.cpp."""
    from kvggml.library import kvggml_version

    return get_stats(ctx) if kvggml_version(llama_cpp.llama_cpp._lib) else None
