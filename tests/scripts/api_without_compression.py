"""kvggml's context API on a context created without compression: prints the errors it raises,
and the metrics text.

Environment: KVGGML_LIB=patched, compression off.
"""

from __future__ import annotations

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, silence_llama_logs


def main() -> None:
    ll = load_llama_cpp()
    silence_llama_logs(ll)
    with Runner(ll, default_model_path(), n_ctx=256) as run:
        for call in (native.get_segments, native.format_sequence):
            try:
                call(run.ctx, 0)
            except RuntimeError as err:
                print(err)
        print(native.format_metrics(run.ctx, 1))  # no error: it says so


if __name__ == "__main__":
    main()
