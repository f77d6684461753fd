"""Which libllama this process runs: stock or patched llama.cpp, from one pinned tree.

llama-cpp-python loads libllama from the directory in LLAMA_CPP_LIB_PATH when
`llama_cpp` is first imported, so the choice must be made before that import:
`load_llama_cpp()` makes it and returns the module.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kvggml.config import Setting

# sanitize: the patched build with AddressSanitizer and UBSan (`make sanitize`); tsan: the patched
# build with ThreadSanitizer (`make tsan`)
VARIANTS = ("stock", "patched", "sanitize", "tsan")
LIB_SETTING = Setting(
    "KVGGML_LIB",
    "patched",
    "which libllama kvggml loads: the patched build, stock llama.cpp, or the patched build sanitized "
    "(AddressSanitizer and UBSan, or ThreadSanitizer)",
    choices=VARIANTS,
)
# For a sanitized build (`make sanitize`, `make fuzz`): stop at the first error, and catch aborts
# (failed checks, GGML_ASSERT) too, so the fuzz driver can save the input that caused one. Python
# keeps objects alive at exit on purpose: leaks are not what these runs look for.
SANITIZER_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:handle_abort=1",
    "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:print_stacktrace=1",
}
REPO = Path(__file__).resolve().parent.parent
# The symbol our first patch exports: present in the patched library only.
KVGGML_SYMBOL = "kvggml_version_string"


def build_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("KVGGML_BUILD_DIR") or REPO / "build")


def library_dir(variant: str, environ: Mapping[str, str] = os.environ) -> Path:
    return build_dir(environ) / variant / "bin"


@dataclass(frozen=True)
class LibraryChoice:
    variant: str  # "stock", "patched", or "custom" when the user set LLAMA_CPP_LIB_PATH alone
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "libllama.so"


def choose_library(environ: Mapping[str, str] = os.environ) -> LibraryChoice:
    """KVGGML_LIB picks one of our builds; without it, an explicit LLAMA_CPP_LIB_PATH is honoured."""
    raw = environ.get(LIB_SETTING.env)
    if not raw and environ.get("LLAMA_CPP_LIB_PATH"):
        return LibraryChoice("custom", Path(environ["LLAMA_CPP_LIB_PATH"]))
    variant = LIB_SETTING.parse(raw) if raw else LIB_SETTING.default
    return LibraryChoice(variant, library_dir(variant, environ))


def load_llama_cpp(environ: Mapping[str, str] | None = None) -> ModuleType:
    """Import llama_cpp bound to the chosen libllama; refuses a second, different choice in one process."""
    environ = os.environ if environ is None else environ
    choice = choose_library(environ)
    if not choice.path.is_file():
        hint = "run `make build`" if choice.variant != "custom" else "check LLAMA_CPP_LIB_PATH"
        raise FileNotFoundError(f"{choice.variant} libllama not found at {choice.path}: {hint}")
    loaded = sys.modules.get("llama_cpp")
    if loaded is not None:
        current = Path(loaded.llama_cpp._base_path).resolve()
        if current != choice.directory.resolve():
            raise RuntimeError(
                f"llama_cpp is already loaded from {current}; one process runs one libllama "
                f"(asked for {choice.directory}): start a new process"
            )
        return loaded
    os.environ["LLAMA_CPP_LIB_PATH"] = str(choice.directory)
    import llama_cpp

    return llama_cpp


def loaded_library_path() -> Path | None:
    module = sys.modules.get("llama_cpp")
    return None if module is None else Path(module.llama_cpp._base_path) / "libllama.so"


def kvggml_version(lib: ctypes.CDLL) -> str | None:
    """Version of our compression code in that library, or None for stock llama.cpp."""
    try:
        fn = getattr(lib, KVGGML_SYMBOL)
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


__all__ = [
    "LibraryChoice",
    "VARIANTS",
    "build_dir",
    "choose_library",
    "kvggml_version",
    "library_dir",
    "load_llama_cpp",
    "loaded_library_path",
]
