"""Load the library KVGGML_LIB picks; prints the error when there is none to load."""

from __future__ import annotations

from kvggml.library import load_llama_cpp


def main() -> None:
    try:
        load_llama_cpp()
    except FileNotFoundError as err:
        print(err)


if __name__ == "__main__":
    main()
