"""kvggml's API read from another thread while the main thread decodes, a compress callback registered;
prints what the reader saw as JSON.

    python tests/scripts/threads.py N_CTX TOKENS N_BATCH
Environment: KVGGML_LIB=patched (or tsan), OLLAMA_KV_COMPRESSION=1, a small threshold and a schedule,
so blocks are encoded and coarsened while they are read. No tokens are removed: every block stays whole.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs

# Counters that only grow while nothing is removed (compressed_bytes shrinks when blocks coarsen).
MONOTONE = ("compressed_tokens", "blocks", "encode_us", "decode_us", "coarsenings")


class Reader(threading.Thread):
    """Reads stats, settings, segments, bitmap and step map in a loop; each read must be one consistent state."""

    def __init__(self, ctx, sinks: int, block: int):
        super().__init__(name="kvggml-reader")
        self.ctx, self.sinks, self.block = ctx, sinks, block
        self.stop = threading.Event()
        self.reads, self.errors, self.block_counts = 0, [], set()

    def fail(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)

    def check_stats(self, stats: dict, last: dict | None) -> None:
        if stats["compressed_tokens"] != stats["blocks"] * self.block:
            self.fail(f"stats: {stats['compressed_tokens']} tokens in {stats['blocks']} whole blocks")
        for name in MONOTONE:
            if last is not None and stats[name] < last[name]:
                self.fail(f"stats: {name} went from {last[name]} to {stats[name]}")

    def check_segments(self, segments: list[dict], n_before: int) -> None:
        # whole blocks, one after the other from the sinks on, the older ones coarsened as far or further
        expected = [(self.sinks + k * self.block, self.sinks + (k + 1) * self.block) for k in range(len(segments))]
        if [(s["p0"], s["p1"]) for s in segments] != expected:
            self.fail(f"segments: positions {[(s['p0'], s['p1']) for s in segments][:8]}...")
        steps = [s["step"] for s in segments]
        if steps != sorted(steps, reverse=True):
            self.fail(f"segments: steps {steps} not oldest-first")
        if len(segments) < n_before:
            self.fail(f"segments: {len(segments)} after {n_before} blocks")

    def check_maps(self, bitmap: list[bool], step_map: list[int]) -> None:
        if not all(bitmap):
            self.fail(f"bitmap: a gap in {bitmap}")
        if any(s < 1 for s in step_map) or step_map != sorted(step_map, reverse=True):
            self.fail(f"step map: {step_map}")

    def run(self) -> None:
        last = None
        try:
            while not self.stop.is_set():
                stats = native.get_stats(self.ctx)
                self.check_stats(stats, last)
                self.check_segments(native.get_segments(self.ctx, 0), stats["blocks"])
                self.check_maps(native.get_bitmap(self.ctx, 0), native.get_step_map(self.ctx, 0))
                native.get_settings(self.ctx)
                self.block_counts.add(stats["blocks"])
                last = stats
                self.reads += 1
                time.sleep(0.005)  # leaves the decode its CPU on a small machine
        except Exception as err:  # reported, so the test shows it
            self.fail(f"{type(err).__name__}: {err}")


def main() -> None:
    n_ctx, n_tokens, n_batch = map(int, sys.argv[1:4])
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    with Runner(llama_cpp, default_model_path(), n_ctx=n_ctx, n_batch=n_batch, n_threads=2) as run:
        events, threads = [], set()

        def on_compress(event: dict) -> None:
            events.append(event)
            threads.add(threading.current_thread().name)

        callback = native.CompressCallback(run.ctx, on_compress)
        settings = native.get_settings(run.ctx)
        reader = Reader(run.ctx, settings["sinks"], 2 ** settings["level"])
        reader.start()
        try:
            run.decode(run.tokenize(default_text())[:n_tokens], 0)
        finally:
            reader.stop.set()
            reader.join()
        stats = native.get_stats(run.ctx)
        report = {
            "reads": reader.reads,
            "errors": reader.errors,
            "distinct_block_counts": len(reader.block_counts),
            "decodes": -(-n_tokens // n_batch),
            "stats": stats,
            "encoded": sum(e["step"] == 0 for e in events),
            "coarsened": sum(e["step"] > 0 for e in events),
            "callback_threads": sorted(threads),
            "callback_errors": [str(e) for e in callback.errors],
        }
        callback.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
