"""llama.cpp memory operations with compression on, beside the same operations on an exact cache.

    python tests/scripts/memory_ops.py SCENARIO MODEL OUT.npz   (MODEL: smollm2 or gemma3)

Prints a JSON report and saves the logits it compares to OUT.npz. Each context picks
compression through OLLAMA_KV_COMPRESSION when it is created, so one process holds both
kinds; with compression off the patched library computes exactly what stock llama.cpp
does (tests/test_tier.py).
Environment: KVGGML_LIB=patched, OLLAMA_KV_COMPRESSION_THRESHOLD, OLLAMA_KV_COMPRESSION_SCHEDULE.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from kvggml import native
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, gemma3_model_path

llama_cpp = load_llama_cpp()
MODELS = {"smollm2": default_model_path, "gemma3": gemma3_model_path}
N_CTX, READ, NEXT = 4096, 1500, 32  # tokens read first, tokens scored after the operation


class Scenario:
    def __init__(self, model: str):
        self.model_path = MODELS[model]()
        self.report: dict = {}
        self.logits: dict[str, np.ndarray] = {}
        with self.context(False) as run:
            self.text = run.tokenize(default_text())
        self.other = self.text[-NEXT:]  # a continuation the context did not read

    def context(self, compress: bool, n_seq_max: int = 1) -> Runner:
        os.environ["OLLAMA_KV_COMPRESSION"] = "1" if compress else "0"
        return Runner(llama_cpp, self.model_path, n_ctx=N_CTX, n_threads=2, n_seq_max=n_seq_max)

    def both(self, name: str, steps, **kwargs) -> None:
        """Run steps(run, compress) on a compressed and an exact context; keep the logits it returns."""
        for compress in (True, False):
            with self.context(compress, **kwargs) as run:
                self.logits[f"{name}-{'compressed' if compress else 'exact'}"] = steps(run, compress)

    def segments(self, run: Runner, seq_id: int = 0) -> list[list[int]]:
        return [[s["p0"], s["p1"], s["n_tokens"]] for s in native.get_segments(run.ctx, seq_id)]

    def read(self) -> None:
        def steps(run, compress):
            run.decode(self.text[:READ], 0)
            if compress:
                self.report["stats"] = native.get_stats(run.ctx)
                self.report["segments"] = self.segments(run)
                self.report["steps"] = [s["step"] for s in native.get_segments(run.ctx, 0)]
            return run.decode(self.text[READ : READ + NEXT], READ, want_logits=True)

        self.both("read", steps)

    # multi-turn chat: the context keeps the common prefix, removes the rest (from inside the
    # compressed region here) and reads the new turn at the same positions
    def remove_tail(self) -> None:
        cut = 1000

        def steps(run, compress):
            run.decode(self.text[:READ], 0)
            run.remove(cut, -1)
            if compress:
                self.report["segments"] = self.segments(run)
                self.report["pos_max"] = llama_cpp.llama_memory_seq_pos_max(run.memory, 0)
            return run.decode(self.other, cut, want_logits=True)

        self.both("removed", steps)
        with self.context(True) as fresh:  # fed only the tokens the others kept
            fresh.decode(self.text[:cut], 0)
            self.logits["fresh-compressed"] = fresh.decode(self.other, cut, want_logits=True)

    def remove_middle(self) -> None:
        def steps(run, compress):
            run.decode(self.text[:READ], 0)
            run.remove(300, 700)
            if compress:
                self.report["segments"] = self.segments(run)
            return run.decode(self.text[READ : READ + NEXT], READ, want_logits=True)

        self.both("removed", steps)

    # two sequences in one cache: a copy of part of sequence 0 (cutting a block) grows its own way
    def sequences(self) -> None:
        def steps(run, compress):
            run.decode(self.text[:1200], 0, seq_id=0)
            llama_cpp.llama_memory_seq_cp(run.memory, 0, 1, 0, 600)
            if compress:
                self.report["segments_copy"] = self.segments(run, 1)
            branch = run.decode(self.text[2000:2400], 600, want_logits=True, seq_id=1)[-NEXT:]
            trunk = run.decode(self.text[1200 : 1200 + NEXT], 1200, want_logits=True, seq_id=0)
            if compress:
                self.report["segments_trunk"] = self.segments(run, 0)
                self.report["segments_branch"] = self.segments(run, 1)
            return np.concatenate([branch, trunk])

        self.both("sequences", steps, n_seq_max=2)

    # llama.cpp's context shift: keep the first 100 tokens, drop 300, slide the rest down
    def shift(self) -> None:
        def steps(run, compress):
            run.decode(self.text[:READ], 0)
            self.report["can_shift" if compress else "can_shift_exact"] = bool(
                llama_cpp.llama_memory_can_shift(run.memory)
            )
            run.remove(100, 400)
            llama_cpp.llama_memory_seq_add(run.memory, 0, 400, -1, -300)
            if compress:
                self.report["segments"] = self.segments(run)
            return run.decode(self.text[READ : READ + NEXT], READ - 300, want_logits=True)

        self.both("shifted", steps)
        self.both(
            "unshifted",
            lambda run, compress: (
                run.decode(self.text[:READ], 0),
                run.decode(self.text[READ : READ + NEXT], READ, True),
            )[1],
        )

    def state(self) -> None:
        with self.context(False) as exact:
            exact.decode(self.text[:READ], 0)
            exact_state = exact.get_state()
            self.report["exact_state_bytes"] = len(exact_state)
        with self.context(True) as run:
            run.decode(self.text[:READ], 0)
            saved = run.get_state()
            self.report["state_bytes"] = len(saved)
            self.report["compressed_tokens"] = native.get_stats(run.ctx)["compressed_tokens"]
            self.report["saved_steps"] = [s["step"] for s in native.get_segments(run.ctx, 0)]
            self.logits["original"] = run.decode(self.text[READ : READ + NEXT], READ, want_logits=True)
        with self.context(True) as restored:
            restored.set_state(saved)
            self.report["restored_segments"] = len(native.get_segments(restored.ctx, 0))
            self.report["restored_steps"] = [s["step"] for s in native.get_segments(restored.ctx, 0)]
            self.logits["restored"] = restored.decode(self.text[READ : READ + NEXT], READ, want_logits=True)
            damaged = {
                "truncated": saved[: len(saved) // 2],
                "flipped": bytearray(saved),
                "exact": exact_state,
            }  # saved without compression: K/V not in the rotated basis
            damaged["flipped"][2000] ^= 0x10  # inside the first compressed block
            for name, data in damaged.items():
                print(f"--- loading the {name} state", file=sys.stderr, flush=True)
                try:
                    restored.set_state(bytes(data))
                    self.report[name] = "loaded"
                except RuntimeError as err:
                    self.report[name] = str(err)
            # the context stays usable: a good state loads again after the failures
            restored.set_state(saved)
            self.logits["reloaded"] = restored.decode(self.text[READ : READ + NEXT], READ, want_logits=True)
        with self.context(False) as plain:
            print("--- loading into a context without compression", file=sys.stderr, flush=True)
            try:
                plain.set_state(saved)
                self.report["into_exact"] = "loaded"
            except RuntimeError as err:
                self.report["into_exact"] = str(err)

    def settings(self) -> None:
        with self.context(True) as run:
            self.report["initial"] = native.get_settings(run.ctx)
            run.decode(self.text[:600], 0)
            self.report["before"] = native.get_stats(run.ctx)
            self.report["set"] = native.set_settings(run.ctx, threshold=128, preset="hi")
            run.decode(self.text[600:601], 600)
            self.report["after"] = native.get_stats(run.ctx)
            self.report["segments"] = native.get_segments(run.ctx, 0)
            errors = {}
            for change in ({"threshold": 10**6}, {"preset": "max"}, {"level": 3}, {"window": 3}):
                try:
                    native.set_settings(run.ctx, **change)
                except ValueError as err:
                    errors[json.dumps(change)] = str(err)
            self.report["errors"] = errors
            self.report["unchanged"] = native.get_settings(run.ctx)


def main() -> None:
    scenario, model, out = sys.argv[1:4]
    s = Scenario(model)
    getattr(s, scenario)()
    np.savez(out, **s.logits)
    print(json.dumps(s.report))


if __name__ == "__main__":
    main()
