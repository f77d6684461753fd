"""The codec checks of tests/test_c_codec.py on the codec inside a library (the patched
libllama), in a process of its own; prints how many golden, malformed and coarsening vectors passed.

    python tests/scripts/codec_in_library.py LIBRARY.so
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_c_codec import bind, check_coarsen_vectors, check_invalid, check_vectors


def main() -> None:
    lib = bind(sys.argv[1])
    print(check_vectors(lib), check_invalid(lib), check_coarsen_vectors(lib))


if __name__ == "__main__":
    main()
