"""kvggml: wavelet compression of the llama.cpp KV cache, driven from Python.

Importing kvggml loads no native library: call `kvggml.library.load_llama_cpp()`
(or use the CLI) so that the stock or the patched libllama is chosen before
llama_cpp is imported.
"""

__version__ = "0.8.0"


def __getattr__(name: str):
    # Llama loads libllama: only on first use, so importing kvggml stays free of native code.
    if name == "Llama":
        from kvggml.llama import Llama

        return Llama
    raise AttributeError(f"module 'kvggml' has no attribute {name!r}")
