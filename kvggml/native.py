"""cffi bindings (ABI mode) to kvggml's C API in the patched libllama.

The functions live in the same libllama that llama-cpp-python loaded (the dynamic
loader hands back that library), so a `llama_context *` from llama_cpp is passed
straight through. With the stock library every entry point is missing and
`open_library` raises a clear error.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from cffi import FFI

from kvggml.library import loaded_library_path
from kvggml.presets import PRESETS_ALLOWED

HEADER = Path(__file__).resolve().parent / "csrc" / "include" / "kvggml.h"


def header_cdef(text: str) -> str:
    """kvggml.h as cffi declarations: without comments, C++-only blocks, preprocessor lines and export macros."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"#ifdef __cplusplus\n.*?#endif", "", text, flags=re.S)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("KVGGML_API ", "")


def header_version(text: str) -> int:
    """KVGGML_VERSION_NUMBER as the header defines it."""
    part = {
        name: int(re.search(rf"#define KVGGML_VERSION_{name}\s+(\d+)", text).group(1))
        for name in ("MAJOR", "MINOR", "PATCH")
    }
    return part["MAJOR"] * 10000 + part["MINOR"] * 100 + part["PATCH"]


# Generated from the header the library is compiled with, so the two cannot drift apart.
HEADER_TEXT = HEADER.read_text()
VERSION_NUMBER = header_version(HEADER_TEXT)
ffi = FFI()
ffi.cdef(header_cdef(HEADER_TEXT))
_lib = None


def open_library():
    """kvggml's functions in the libllama this process loaded (llama_cpp must be imported first)."""
    global _lib
    if _lib is None:
        path = loaded_library_path()
        if path is None:
            raise RuntimeError("load llama_cpp first (kvggml.library.load_llama_cpp)")
        lib = ffi.dlopen(str(path))
        if not hasattr(lib, "kvggml_version_string"):
            raise RuntimeError(
                f"{path} is stock llama.cpp: kvggml's API needs the patched library (KVGGML_LIB=patched)"
            )
        built = lib.kvggml_version_number()
        if built != VERSION_NUMBER:
            raise RuntimeError(
                f"{path} was built from kvggml {ffi.string(lib.kvggml_version_string()).decode()} "
                f"({built}), but this package's kvggml.h is {VERSION_NUMBER}: rebuild it with `make build`"
            )
        _lib = lib
    return _lib


def _pointer(ctx):
    address = getattr(ctx, "value", ctx)
    if not address:
        raise ValueError("ctx is a null llama_context pointer")
    return ffi.cast("struct llama_context *", address)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        lib = open_library()
        detail = ffi.string(lib.kvggml_last_error()).decode() or ffi.string(lib.kvggml_error_name(rc)).decode()
        raise RuntimeError(f"{what} failed: {detail}")
    return rc


def _as_dict(record, ctype: str) -> dict:
    """A C record as a dict: char arrays as strings, other arrays as lists."""

    def value(name: str, field) -> object:
        raw = getattr(record, name)
        if field.type.kind != "array":
            return int(raw)
        if field.type.item.cname == "char":
            return ffi.string(raw).decode()
        return list(raw)

    return {name: value(name, field) for name, field in ffi.typeof(ctype).fields}


def _read_all(call, ctype: str, what: str):
    """(buffer, n): call(buffer, n) asked for n items until it had room for all of them. Another
    thread's decode may add some between asking how many there are and reading them."""
    n = _check(call(ffi.NULL, 0), what)
    while True:
        buffer = ffi.new(f"{ctype}[]", max(n, 1))
        found = _check(call(buffer, n), what)
        if found <= n:
            return buffer, found
        n = found


def get_segments(ctx, seq_id: int = -1) -> list[dict]:
    """Compressed blocks of one sequence (-1: all), in position order: seq_id, p0, p1, level, n_tokens,
    bytes, step (hierarchy steps taken) and bits (its subband widths now, level + 1 of them)."""
    lib = open_library()
    out, n = _read_all(
        lambda buf, n: lib.kvggml_get_segments(_pointer(ctx), seq_id, buf, n), "kvggml_segment", "kvggml_get_segments"
    )
    segments = [_as_dict(out[i], "kvggml_segment") for i in range(n)]
    for segment in segments:
        segment["bits"] = segment["bits"][: segment["level"] + 1]
    return segments


def get_head_reports(ctx, seq_id: int = -1) -> list[dict]:
    """One record per cache layer and KV head (layer-major), over the blocks of one sequence (-1: all):
    layer, head, attention (mean relative attention its sampled queries gave the blocks; None when
    none was sampled), blocks, steps (ladder steps its channels took, summed) and bytes (its K and V
    channels' scales and values)."""
    lib = open_library()
    out, n = _read_all(
        lambda buf, n: lib.kvggml_get_head_reports(_pointer(ctx), seq_id, buf, n),
        "kvggml_head_report",
        "kvggml_get_head_reports",
    )
    reports = []
    for i in range(n):
        record = {name: getattr(out[i], name) for name, _ in ffi.typeof("kvggml_head_report").fields}
        attention = float(record["attention"])
        reports.append(
            {
                **{k: int(v) for k, v in record.items() if k != "attention"},
                "attention": None if attention != attention else attention,
            }
        )
    return reports


def get_bitmap(ctx, seq_id: int) -> list[bool]:
    """One flag per block slot of the sequence (after the sinks): compressed or not."""
    lib = open_library()
    bits, n_bits = _read_all(
        lambda buf, n: lib.kvggml_get_bitmap(_pointer(ctx), seq_id, buf, (n + 7) // 8), "uint8_t", "kvggml_get_bitmap"
    )
    return [bool(bits[k // 8] >> (k % 8) & 1) for k in range(n_bits)]


def get_step_map(ctx, seq_id: int) -> list[int]:
    """One value per block slot of the sequence, as get_bitmap: 0 not compressed, 1 + hierarchy step."""
    lib = open_library()
    steps, n = _read_all(
        lambda buf, n: lib.kvggml_get_step_map(_pointer(ctx), seq_id, buf, n), "uint8_t", "kvggml_get_step_map"
    )
    return list(steps[0:n])


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
        _check(
            open_library().kvggml_set_compress_callback(_pointer(ctx), self._c_fn, ffi.NULL),
            "kvggml_set_compress_callback",
        )

    def _call(self, event, user_data):
        self.fn(_as_dict(event, "kvggml_event"))

    def close(self) -> None:
        open_library().kvggml_set_compress_callback(_pointer(self.ctx), ffi.NULL, ffi.NULL)


def _format(call, what: str) -> str:
    """The text of a kvggml_format_* call (asked for its length first, as with snprintf)."""
    while True:
        n = _check(call(ffi.NULL, 0), what)
        buffer = ffi.new("char[]", n + 1)
        if _check(call(buffer, n + 1), what) <= n:  # another thread's decode may have lengthened it
            return ffi.string(buffer).decode()


def format_sequence(ctx, seq_id: int) -> str:
    """One line on a sequence's compressed blocks, as llama-server logs it per slot."""
    lib = open_library()
    return _format(lambda buf, n: lib.kvggml_format_sequence(_pointer(ctx), seq_id, buf, n), "kvggml_format_sequence")


def format_metrics(ctx, n_seq: int) -> str:
    """The context's statistics in Prometheus' text format, as llama-server's /metrics gives them."""
    lib = open_library()
    return _format(lambda buf, n: lib.kvggml_format_metrics(_pointer(ctx), n_seq, buf, n), "kvggml_format_metrics")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (format_metrics, llama-server's /metrics) as {name with its labels: value}."""
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in lines}


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
        raise ValueError(f"preset={new['preset']!r} is not allowed: expected {PRESETS_ALLOWED}")
    settings.preset = preset
    lib = open_library()
    if lib.kvggml_set_settings(_pointer(ctx), settings) < 0:
        raise ValueError(ffi.string(lib.kvggml_last_error()).decode())
    return get_settings(ctx)


def stats_or_none(llama_cpp: ModuleType, ctx: int) -> dict | None:
    """get_stats on the patched library, None on stock llama.cpp."""
    from kvggml.library import kvggml_version

    return get_stats(ctx) if kvggml_version(llama_cpp.llama_cpp._lib) else None
