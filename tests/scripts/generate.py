"""A short greedy completion on the library KVGGML_LIB picks; prints the text, the library
loaded, the kvggml version it carries and whether AddressSanitizer's runtime is loaded, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from kvggml.library import kvggml_version, load_llama_cpp, loaded_library_path
from kvggml.model import default_model_path


def main() -> None:
    llama_cpp = load_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_completion("The three primary colors are", max_tokens=12, temperature=0.0)
    print(
        json.dumps(
            {
                "text": out["choices"][0]["text"],
                "library": str(loaded_library_path()),
                "kvggml": kvggml_version(llama_cpp.llama_cpp._lib),
                "asan_loaded": "libasan" in Path("/proc/self/maps").read_text(),
            }
        )
    )


if __name__ == "__main__":
    main()
