"""Open kvggml's API on the library KVGGML_LIB picks; prints the error, if any.

    python tests/scripts/open_api.py [ahead]

With `ahead`, this package's kvggml.h is taken for one version ahead of the library.
"""

from __future__ import annotations

import sys

from kvggml import native
from kvggml.library import load_llama_cpp


def main() -> None:
    load_llama_cpp()
    if sys.argv[1:] == ["ahead"]:
        native.VERSION_NUMBER += 1
    try:
        native.open_library()
        print("opened")
    except RuntimeError as err:
        print(err)


if __name__ == "__main__":
    main()
