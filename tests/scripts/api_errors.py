"""kvggml's C API given bad arguments, called straight through cffi: prints, as JSON, the return
code and kvggml_last_error() of each call. Environment: KVGGML_LIB=patched, compression on."""

from __future__ import annotations

import json

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs


def main() -> None:
    ll = load_llama_cpp()
    silence_llama_logs(ll)
    lib, ffi = native.open_library(), native.ffi
    out = {}

    def record(name: str, rc: int) -> None:
        out[name] = [rc, ffi.string(lib.kvggml_last_error()).decode()]

    with Runner(ll, default_model_path(), n_ctx=1024) as run:
        run.decode(run.tokenize(default_text())[:600], 0)
        ctx = native._pointer(run.ctx)
        stats, settings = ffi.new("kvggml_stats *"), ffi.new("kvggml_settings *")
        record("get_stats(NULL)", lib.kvggml_get_stats(ffi.NULL, stats))
        record("get_stats(ctx, NULL)", lib.kvggml_get_stats(ctx, ffi.NULL))
        record("get_segments(NULL)", lib.kvggml_get_segments(ffi.NULL, 0, ffi.NULL, 0))
        record("get_segments(out NULL, capacity 4)", lib.kvggml_get_segments(ctx, 0, ffi.NULL, 4))
        record("get_head_reports(NULL)", lib.kvggml_get_head_reports(ffi.NULL, 0, ffi.NULL, 0))
        record("get_head_reports(out NULL, capacity 4)", lib.kvggml_get_head_reports(ctx, 0, ffi.NULL, 4))
        heads = ffi.new("kvggml_head_report[]", 2)
        record("get_head_reports(capacity 2)", lib.kvggml_get_head_reports(ctx, 0, heads, 2))
        fields = ("layer", "head", "blocks", "steps", "bytes")
        out["second_head"] = {name: int(getattr(heads[1], name)) for name in fields}
        record("get_bitmap(seq -1)", lib.kvggml_get_bitmap(ctx, -1, ffi.NULL, 0))
        record("get_bitmap(bits NULL, n_bytes 4)", lib.kvggml_get_bitmap(ctx, 0, ffi.NULL, 4))
        record("get_settings(NULL)", lib.kvggml_get_settings(ffi.NULL, settings))
        record("get_settings(ctx, NULL)", lib.kvggml_get_settings(ctx, ffi.NULL))
        record("set_settings(ctx, NULL)", lib.kvggml_set_settings(ctx, ffi.NULL))
        lib.kvggml_get_settings(ctx, settings)
        settings.preset = b"x" * 16  # fills the array: no terminating NUL
        record("set_settings(preset unterminated)", lib.kvggml_set_settings(ctx, settings))
        record("set_compress_callback(NULL)", lib.kvggml_set_compress_callback(ffi.NULL, ffi.NULL, ffi.NULL))
        record("format_sequence(NULL)", lib.kvggml_format_sequence(ffi.NULL, 0, ffi.NULL, 0))
        record("format_sequence(seq -1)", lib.kvggml_format_sequence(ctx, -1, ffi.NULL, 0))
        record("format_sequence(buf NULL, size 4)", lib.kvggml_format_sequence(ctx, 0, ffi.NULL, 4))
        record("format_metrics(NULL)", lib.kvggml_format_metrics(ffi.NULL, 1, ffi.NULL, 0))
        record("format_metrics(n_seq -1)", lib.kvggml_format_metrics(ctx, -1, ffi.NULL, 0))
        # a buffer too small is no error: the call says how many there are and fills what fits
        segments = ffi.new("kvggml_segment[]", 1)
        record("get_segments(capacity 1)", lib.kvggml_get_segments(ctx, 0, segments, 1))
        out["first_segment"] = [segments[0].p0, segments[0].p1]
        # nor for a text: its whole length is returned, and what fits written, NUL-terminated
        line = ffi.new("char[]", 12)
        record("format_sequence(size 12)", lib.kvggml_format_sequence(ctx, 0, line, 12))
        out["format_sequence(size 12) wrote"] = ffi.string(line).decode()
        out["format_sequence"] = native.format_sequence(run.ctx, 0)
        try:
            native.get_stats(0)
        except ValueError as err:
            out["native.get_stats(0)"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
