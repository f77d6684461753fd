"""Open kvggml's API as if this package's kvggml.h were one version ahead of the library;
prints the error. Environment: KVGGML_LIB=patched."""

from __future__ import annotations

from kvggml import native
from kvggml.library import load_llama_cpp


def main() -> None:
    load_llama_cpp()
    native.VERSION_NUMBER += 1
    try:
        native.open_library()
    except RuntimeError as err:
        print(err)


if __name__ == "__main__":
    main()
