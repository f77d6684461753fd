"""`kvggml.Llama`: llama_cpp.Llama on the patched library, with `.compression`.

Importing this module loads libllama (the patched build unless KVGGML_LIB says
otherwise), so it is imported lazily: `from kvggml import Llama`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kvggml import native
from kvggml.config import CompressionConfig
from kvggml.library import load_llama_cpp

llama_cpp = load_llama_cpp()


class Compression:
    """What the context's KV cache holds, and a hook on every compressed block."""

    def __init__(self, llm: Llama):
        self._llm = llm
        self._callback: native.CompressCallback | None = None

    @property
    def enabled(self) -> bool:
        return self.stats()["enabled"] == 1

    def settings(self) -> dict:
        """threshold, sinks, level, recent_capacity (sinks + threshold the cache was sized for), preset."""
        return native.get_settings(self._llm.ctx)

    def configure(self, **changes) -> dict:
        """Change threshold, sinks and/or preset from the next decode on (ValueError names a bad value)."""
        return native.set_settings(self._llm.ctx, **changes)

    def stats(self) -> dict:
        """exact_cells, exact_bytes, compressed_bytes, compressed_tokens, blocks, encode_us, decode_us."""
        return native.get_stats(self._llm.ctx)

    def segments(self, seq_id: int = 0) -> list[dict]:
        """Compressed blocks of the sequence, in position order: p0, p1, level, bytes."""
        return native.get_segments(self._llm.ctx, seq_id)

    def bitmap(self, seq_id: int = 0) -> list[bool]:
        return native.get_bitmap(self._llm.ctx, seq_id)

    def step_map(self, seq_id: int = 0) -> list[int]:
        return native.get_step_map(self._llm.ctx, seq_id)

    def head_reports(self, seq_id: int = 0) -> list[dict]:
        """Per cache layer and KV head: the attention it gave the blocks, and the steps and bytes it kept."""
        return native.get_head_reports(self._llm.ctx, seq_id)

    def on_compress(self, fn: Callable[[dict], None] | None) -> None:
        """Call fn(event) for each block compressed from now on (None removes it); see native.CompressCallback."""
        if self._callback is not None:
            self._callback.close()
            self._callback = None
        if fn is not None:
            self._callback = native.CompressCallback(self._llm.ctx, fn)

    @property
    def callback_errors(self) -> list[BaseException]:
        return [] if self._callback is None else self._callback.errors


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama whose KV cache is compressed by the patched library (compression=True, the default).

    compression=None leaves OLLAMA_KV_COMPRESSION* as the environment has them; True or False
    sets OLLAMA_KV_COMPRESSION for this context (the library reads it at context creation).
    Flash attention is on unless flash_attn=False is passed.
    """

    def __init__(self, model_path: str, *args, compression: bool | None = True, **kwargs):
        if compression is not None:
            os.environ["OLLAMA_KV_COMPRESSION"] = "1" if compression else "0"
        CompressionConfig.from_env()  # a bad variable fails here with its message, not as a failed context
        kwargs.setdefault("flash_attn", True)
        super().__init__(model_path, *args, **kwargs)
        self.compression = Compression(self)
