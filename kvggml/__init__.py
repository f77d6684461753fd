"""kvggml: wavelet compression of the llama.cpp KV cache, driven from Python.

Importing kvggml loads no native library: call `kvggml.library.load_llama_cpp()`
(or use the CLI) so that the stock or the patched libllama is chosen before
llama_cpp is imported.
"""

__version__ = "0.1.0"
