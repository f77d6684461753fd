"""Model-based test of llama.cpp's memory operations with compression on (issue 13).

    python tests/scripts/memory_model.py [--variant preset|hierarchy] [--seeds 0-9] [--ops 200]
    python tests/scripts/memory_model.py --replay '[["decode", 0, 0, 120], ["probe", 0, 120]]'

Random operations (decode, seq_rm, seq_cp, seq_keep, seq_add, seq_div, state save and restore
of the whole context or of one sequence, 1-4 sequences) go to a compressed and to an exact
context in one unified cache, and to a pure-Python model of what each cache holds: cells
(position, sequences) and, with compression, the tier's blocks (per token its position).
After every operation each sequence's positions (llama_memory_seq_pos_min/max of both
contexts), and the compressed context's segments, bitmap and step map must equal the model's.
A probe decodes one token on both contexts and compares the next-token logits: their KL
divergence must stay within TOLERANCE_FACTOR times the worst of plain reading (the baseline,
measured at start), then the probe token is removed again.

A failing case is shrunk (delta debugging over the operation list) and printed; tests keep
them as explicit operation lists (--replay). The JSON report is the last stdout line.
Environment: KVGGML_LIB=patched. The script sets OLLAMA_KV_COMPRESSION* itself, per context.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import sys
import time
from collections import Counter

import numpy as np
from scipy.special import log_softmax

from kvggml import native
from kvggml.config import CompressionConfig
from kvggml.library import load_llama_cpp
from kvggml.metrics import kld_per_row
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs
from kvggml.presets import role_bits

N_CTX, N_SEQ_MAX = 2048, 4
PROBE = 4  # tokens a probe decodes: their mean KLD is steadier than one token's
# What a probe may diverge by depends on the state of its sequence (CacheModel.regime):
#  - "reading": its BOS first and exact among the sinks, its newest THRESHOLD tokens exact, as reading
#    leaves it; held to TOLERANCE_FACTOR times the worst probe of plain reading;
#  - "window lost": the same, but some of its newest tokens are in blocks (a copy or a removal that ended in
#    the compressed region, and what was read since); held to TOLERANCE_FACTOR times the worst probe of a
#    reading cut back into its blocks;
#  - "no sink": it lost its BOS, or a shift moved it past the sinks where it was compressed. No bound holds
#    there: the model turns chaotic without its attention sink, and the f16 rounding of the rotated cache
#    alone, nothing compressed, moved a 22-token sequence by 8.6 nats on a token (measured).
#    Its probes are run and reported, not asserted; the positions, segments and bitmaps are.
REGIMES = ("reading", "window lost", "no sink")
POS_LIMIT = N_CTX  # positions stay below n_ctx, cells of the exact context within it
# A small window so blocks are compressed within a few operations. "hierarchy" narrows blocks 128 tokens
# old, then 256 old, keeping every subband; "drop" then drops the finest subband (a block with fewer
# coefficient rows). Dropping is costly on this model with so short a window: the worst probe of reading
# reaches KLD 0.87 (the preset's: 0.07), so "drop"'s logits tolerance is loose and its structural checks
# carry it; "hierarchy"'s worst probe is 0.09.
VARIANTS = {
    "preset": {"OLLAMA_KV_COMPRESSION_THRESHOLD": "64"},
    "hierarchy": {
        "OLLAMA_KV_COMPRESSION_THRESHOLD": "64",
        "OLLAMA_KV_COMPRESSION_SCHEDULE": "128:6.3.3.3.3,256:5.3.3.3.3",
    },
    "drop": {
        "OLLAMA_KV_COMPRESSION_THRESHOLD": "64",
        "OLLAMA_KV_COMPRESSION_SCHEDULE": "128:6.3.3.3.3,256:5.3.3.3.0",
    },
}
# Measured over 5 seeds x 200 operations per variant: correct operations stay within 2.9x of the baseline
# (preset: worst probe 0.197, baseline 0.069), where a context that read its tokens in the wrong order
# (--fault reverse) reaches 10x to 43x within its first 2 to 13 operations.
TOLERANCE_FACTOR = 4.0

llama_cpp = load_llama_cpp()
silence_llama_logs(llama_cpp)


class Cell:
    __slots__ = ("pos", "seqs")

    def __init__(self, pos: int, seqs: set[int]):
        self.pos, self.seqs = pos, seqs


class Block:
    """One compressed block: its sequence, per token its position (-1: removed), its hierarchy step."""

    __slots__ = ("seq", "pos", "step")

    def __init__(self, seq: int, pos: list[int], step: int = 0):
        self.seq, self.pos, self.step = seq, pos, step

    def alive(self) -> list[int]:
        return [p for p in self.pos if p >= 0]

    def first(self) -> int:
        return min(self.alive())

    def end(self) -> int:
        return max(self.pos) + 1


def normalise(p0: int, p1: int) -> tuple[int, int]:
    """llama.cpp's convention: p0 < 0 is 0, p1 < 0 is the end."""
    return max(p0, 0), p1 if p1 >= 0 else 2**31 - 1


class CacheModel:
    """What one unified llama.cpp KV cache holds: cells (a position, the sequences sharing it) and,
    with compression, the blocks of the tier (kvggml/csrc/tier*.cpp, docs/API.md), in the tier's order."""

    def __init__(self, config: CompressionConfig | None):
        self.cfg = config
        self.cells: list[Cell] = []
        self.blocks: list[Block] = []
        self.bos: dict[int, set[int]] = {s: set() for s in range(N_SEQ_MAX)}  # where each sequence's BOS is

    def regime(self, seq: int) -> str:
        """The state of a sequence for its probes (REGIMES). Its BOS is a sink while at a position below
        the sinks: a shift can move it past them, and then it is compressed like any token."""
        held = self.positions(seq)
        if not held or held[0] not in self.bos[seq] or held[0] >= self.cfg.sinks:
            return "no sink"
        exact = sorted(c.pos for c in self.cells_of(seq))
        n = min(self.cfg.threshold, len(held))  # its newest tokens, exact after reading
        return "reading" if exact[-n:] == held[-n:] else "window lost"

    def positions(self, seq: int) -> list[int]:
        held = [c.pos for c in self.cells if seq in c.seqs]
        held += [p for b in self.blocks if b.seq == seq for p in b.alive()]
        return sorted(held)

    def cells_of(self, seq: int) -> list[Cell]:
        return [c for c in self.cells if seq in c.seqs]

    def decode(self, seq: int, n: int) -> int:
        """n tokens at the sequence's next position; returns the first position."""
        held = self.positions(seq)
        start = held[-1] + 1 if held else 0
        self.bos[seq] |= set() if held else {0}  # a new sequence starts with BOS
        self.cells += [Cell(start + i, {seq}) for i in range(n)]
        self.compress()
        return start

    def rm(self, seq: int, p0: int, p1: int) -> None:
        p0, p1 = normalise(p0, p1)
        for s in range(N_SEQ_MAX) if seq < 0 else [seq]:
            self.bos[s] = {p for p in self.bos[s] if not p0 <= p < p1}
        for c in self.cells:
            if p0 <= c.pos < p1:
                c.seqs = set() if seq < 0 else c.seqs - {seq}
        self.cells = [c for c in self.cells if c.seqs]
        for b in self.blocks:
            if seq < 0 or b.seq == seq:
                b.pos = [-1 if p0 <= p < p1 else p for p in b.pos]  # a block goes with its last token
        self.blocks = [b for b in self.blocks if b.alive()]

    def cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if src == dst:
            return  # llama.cpp: nothing to do
        p0, p1 = normalise(p0, p1)
        self.bos[dst] |= {p for p in self.bos[src] if p0 <= p < p1}
        for c in self.cells:
            if p0 <= c.pos < p1 and src in c.seqs:
                c.seqs.add(dst)  # one cell, shared
        for b in list(self.blocks):
            if b.seq == src and any(p0 <= p < p1 for p in b.alive()):
                self.blocks.append(Block(dst, [p if p0 <= p < p1 else -1 for p in b.pos], b.step))

    def keep(self, seq: int) -> None:
        self.cells = [c for c in self.cells if seq in c.seqs]
        for c in self.cells:
            c.seqs = {seq}
        self.blocks = [b for b in self.blocks if b.seq == seq]
        self.bos = {s: self.bos[s] if s == seq else set() for s in self.bos}

    def move(self, seq: int, p0: int, p1: int, new_pos) -> bool:
        """seq_add / seq_div: positions of [p0, p1) go to new_pos(p); below 0 is removed. A cell
        moves for every sequence sharing it (llama.cpp), a block belongs to one. True if a block moved."""
        p0, p1 = normalise(p0, p1)
        self.bos[seq] = {q for q in (new_pos(p) if p0 <= p < p1 else p for p in self.bos[seq]) if q >= 0}
        for c in self.cells:
            if p0 <= c.pos < p1 and seq in c.seqs:
                c.pos = new_pos(c.pos)
        self.cells = [c for c in self.cells if c.pos >= 0]
        hit = False
        for b in self.blocks:
            if b.seq == seq and any(p0 <= p < p1 for p in b.alive()):
                hit = True
                b.pos = [max(new_pos(p), -1) if p >= 0 and p0 <= p < p1 else p for p in b.pos]
        self.blocks = [b for b in self.blocks if b.alive()]
        return hit

    def compress(self) -> None:
        """Tier::compress after a micro-batch: every whole block of consecutive positions held by one
        sequence alone, after the sinks and older than the window, leaves the cells; then the hierarchy."""
        if self.cfg is None:
            return
        B = self.cfg.block_tokens
        for seq in range(N_SEQ_MAX):
            cells = sorted(self.cells_of(seq), key=lambda c: c.pos)
            if not cells:
                continue
            limit = cells[-1].pos + 1 - self.cfg.threshold
            run: list[Cell] = []
            for c in cells:
                if c.pos < self.cfg.sinks:
                    continue
                if c.pos >= limit:
                    break
                if len(c.seqs) != 1 or (run and c.pos != run[-1].pos + 1):
                    run = []  # a shared cell stays exact; a block holds consecutive positions
                if len(c.seqs) == 1:
                    run.append(c)
                if len(run) == B:
                    self.blocks.append(Block(seq, [r.pos for r in run]))
                    gone = set(map(id, run))
                    self.cells = [x for x in self.cells if id(x) not in gone]
                    run = []
        ladder = self.cfg.ladder()
        newest = {s: max([p + 1 for p in self.positions(s)], default=0) for s in range(N_SEQ_MAX)}
        for b in self.blocks:
            while b.step < len(ladder) and newest[b.seq] - b.end() >= ladder[b.step].age:
                b.step += 1

    def save_seq(self, seq: int) -> tuple:
        cells = [c.pos for c in self.cells_of(seq)]
        return cells, [copy.deepcopy(b) for b in self.blocks if b.seq == seq], set(self.bos[seq])

    def load_seq(self, dst: int, saved: tuple) -> None:
        """llama_state_seq_set_data into dst: dst's tokens are removed, the saved ones come back as dst's own."""
        self.rm(dst, -1, -1)
        self.cells += [Cell(p, {dst}) for p in saved[0]]
        self.blocks += [Block(dst, list(b.pos), b.step) for b in saved[1]]
        self.bos[dst] = set(saved[2])

    # what kvggml's API reports for a sequence (kvggml.h)
    def segments(self, seq: int) -> list[tuple]:
        return sorted((b.first(), b.end(), len(b.alive()), b.step) for b in self.blocks if b.seq == seq)

    def slots(self, seq: int) -> list[int]:
        """The step map: per block slot after the sinks, 0 or 1 + step of the block starting there
        (the last in the tier's order wins)."""
        B, sinks = self.cfg.block_tokens, self.cfg.sinks
        out: list[int] = []
        for b in self.blocks:
            if b.seq == seq:
                k = max(b.first() - sinks, 0) // B
                out += [0] * (k + 1 - len(out))
                out[k] = b.step + 1
        return out


class Mismatch(AssertionError):
    def __init__(self, check: str, message: str, **details):
        super().__init__(f"{check}: {message}")
        self.check, self.details = check, details


def state_bytes(ctx, seq: int | None) -> bytes:
    if seq is None:
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buf, size)
    else:
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
    assert written == size, f"state: {written} of {size} bytes written"
    return bytes(buf)


def load_state(ctx, data: bytes, seq: int | None) -> None:
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if seq is None:
        read = llama_cpp.llama_state_set_data(ctx, buf, len(data))
    else:
        read = llama_cpp.llama_state_seq_set_data(ctx, buf, len(data), seq)
    if read == 0:
        raise Mismatch("state", f"the saved state was rejected (sequence {seq})")


def context(variant: str, compress: bool) -> Runner:
    for name in [k for k in os.environ if k.startswith("OLLAMA_KV_COMPRESSION")]:
        del os.environ[name]
    os.environ.update(VARIANTS[variant], OLLAMA_KV_COMPRESSION="1" if compress else "0")
    return Runner(llama_cpp, default_model_path(), n_ctx=N_CTX, n_threads=THREADS, n_seq_max=N_SEQ_MAX)


THREADS = 1
TEXT: np.ndarray = np.zeros(0, dtype=np.int32)


def kld(exact: np.ndarray, compressed: np.ndarray) -> np.ndarray:
    return kld_per_row(log_softmax(exact.astype(np.float64), -1), log_softmax(compressed.astype(np.float64), -1))


def baseline(variant: str) -> dict[str, float]:
    """The worst probe (the mean KLD of its tokens) of reading, per asserted regime: 512 tokens read, then
    128 more PROBE at a time, each attending to the blocks compressed before it ("reading"); then
    everything from 256 on removed, the exact window with it, and 128 read again the same way ("window lost")."""

    def probes(run: Runner, start: int) -> np.ndarray:
        return np.concatenate([run.decode(TEXT[p : p + PROBE], p, True) for p in range(start, start + 128, PROBE)])

    logits: dict[str, list[np.ndarray]] = {"reading": [], "window lost": []}
    for compress in (True, False):
        with context(variant, compress) as run:
            run.decode(TEXT[:512], 0)
            logits["reading"].append(probes(run, 512))
            run.remove(256, -1)
            logits["window lost"].append(probes(run, 256))
    return {regime: float(kld(e, c).reshape(-1, PROBE).mean(-1).max()) for regime, (c, e) in logits.items()}


class Harness:
    """A compressed and an exact context, and a model of each, driven by the same operations."""

    def __init__(self, variant: str, tolerance: dict[str, float], fault: str | None = None):
        self.config = CompressionConfig.from_env({**VARIANTS[variant], "OLLAMA_KV_COMPRESSION": "1"})
        self.comp, self.exact = context(variant, True), context(variant, False)
        self.capacity = native.get_stats(self.comp.ctx)["exact_cells"]
        self.model_comp, self.model_exact = CacheModel(self.config), CacheModel(None)
        self.tolerance, self.fault = tolerance, fault
        self.shift_pending = False  # llama.cpp saves a pending K-shift's positions but not the shift itself
        self.snapshot = self.seq_snapshot = None
        self.ops: Counter = Counter()
        self.checks: Counter = Counter()
        self.seen: Counter = Counter()
        self.klds: dict[str, list[float]] = {regime: [] for regime in REGIMES}
        self.skipped = 0
        self.probe_rows: list = []

    def close(self) -> None:
        self.comp.close()
        self.exact.close()

    def both(self):
        return ((self.comp, self.model_comp), (self.exact, self.model_exact))

    # -- whether an operation can run: the caches' cells, and what llama.cpp defines --
    def fits(self, n: int, seq: int) -> bool:
        held = self.model_exact.positions(seq)
        start = held[-1] + 1 if held else 0
        return (
            start + n <= POS_LIMIT
            and len(self.model_comp.cells) + n <= self.capacity
            and len(self.model_exact.cells) + n <= N_CTX
        )

    def movable(self, seq: int, p0: int, p1: int, new_pos) -> bool:
        """A move that touches no cell shared with another sequence: llama.cpp moves a shared cell for
        all its sequences, where the copy of a compressed block belongs to its sequence alone."""
        lo, hi = normalise(p0, p1)
        shared = {c.pos for c in self.model_exact.cells if seq in c.seqs and len(c.seqs) > 1}
        moved = [p for p in self.model_exact.positions(seq) if lo <= p < hi]
        landing = {new_pos(p) for p in moved}
        return not any(lo <= p < hi for p in shared) and not landing & shared and max(landing, default=0) < POS_LIMIT

    def valid(self, op: list) -> bool:
        kind, args = op[0], op[1:]
        if kind == "decode":
            return args[2] > 0 and self.fits(args[2], args[0])
        if kind == "probe":
            return bool(self.model_exact.positions(args[0])) and self.fits(1, args[0])
        if kind == "add":
            return self.movable(args[0], args[1], args[2], lambda p: p + args[3])
        if kind == "div":
            return args[3] > 0 and self.movable(args[0], args[1], args[2], lambda p: p // args[3])
        if kind in ("save", "save_seq"):
            return not self.shift_pending
        if kind == "restore":
            return self.snapshot is not None
        if kind == "restore_seq":
            if self.seq_snapshot is None:
                return False
            dst = args[0]
            return all(
                len(m.cells) - sum(c.seqs == {dst} for c in m.cells) + len(saved[0]) <= cap
                for m, cap, (_, saved) in zip(
                    (self.model_comp, self.model_exact), (self.capacity, N_CTX), self.seq_snapshot, strict=True
                )
            )
        return True

    # -- applying one operation to both contexts and both models --
    def apply(self, op: list) -> bool:
        """Run op if valid, then check everything; False when skipped. Raises Mismatch."""
        if not self.valid(op):
            self.skipped += 1
            return False
        kind, args = op[0], op[1:]
        getattr(self, "op_" + kind)(*args)
        self.ops[kind] += 1
        self.check()
        return True

    def op_decode(self, seq: int, offset: int, n: int) -> None:
        tokens = TEXT[(offset + np.arange(n)) % len(TEXT)]
        if not self.model_exact.positions(seq):
            tokens[0] = llama_cpp.llama_vocab_bos(self.exact.vocab)  # a new sequence starts with BOS
        for run, model in self.both():
            start = model.decode(seq, n)
            read = tokens[::-1] if self.fault == "reverse" and run is self.comp else tokens
            run.decode(read, start, seq_id=seq)
        self.shift_pending = False

    def op_probe(self, seq: int, offset: int) -> None:
        logits = []
        regime = self.model_comp.regime(seq)
        tokens = TEXT[(offset + np.arange(PROBE)) % len(TEXT)]
        for run, model in self.both():
            start = model.decode(seq, PROBE)
            logits.append(run.decode(tokens, start, want_logits=True, seq_id=seq))
            self.remove(run, model, seq, start, start + PROBE)
        self.shift_pending = False
        per_token = kld(logits[1], logits[0])
        self.probe_rows.append(per_token)
        divergence = float(per_token.mean())
        self.klds[regime].append(divergence)
        if regime not in self.tolerance:
            return  # no bound holds there (REGIMES)
        self.checks["logits"] += 1
        if divergence > self.tolerance[regime]:
            raise Mismatch(
                "logits",
                f"sequence {seq} ({regime}): KLD {divergence:.4f} above the tolerance {self.tolerance[regime]:.4f}",
                kld=divergence,
                regime=regime,
            )

    def remove(self, run: Runner, model: CacheModel, seq: int, p0: int, p1: int) -> None:
        assert llama_cpp.llama_memory_seq_rm(run.memory, seq, p0, p1), "seq_rm refused"
        model.rm(seq, p0, p1)

    def op_rm(self, seq: int, p0: int, p1: int) -> None:
        for run, model in self.both():
            self.remove(run, model, seq, p0, p1)

    def op_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """dst's tokens of [p0, p1) are replaced by src's: removed first, as llama.cpp's server does
        before a copy, so a copy never lands on positions dst holds."""
        copied = False
        for run, model in self.both():
            if src != dst:
                self.remove(run, model, dst, p0, p1)
            n_blocks = len(model.blocks)
            llama_cpp.llama_memory_seq_cp(run.memory, src, dst, p0, p1)
            model.cp(src, dst, p0, p1)
            copied = copied or len(model.blocks) > n_blocks
        self.seen["copied blocks"] += copied

    def op_keep(self, seq: int) -> None:
        for run, model in self.both():
            llama_cpp.llama_memory_seq_keep(run.memory, seq)
            model.keep(seq)

    def op_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        for run, model in self.both():
            llama_cpp.llama_memory_seq_add(run.memory, seq, p0, p1, delta)
            self.seen["moved blocks"] += model.move(seq, p0, p1, lambda p: p + delta)
        self.shift_pending = True

    def op_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        for run, model in self.both():
            llama_cpp.llama_memory_seq_div(run.memory, seq, p0, p1, d)
            self.seen["moved blocks"] += model.move(seq, p0, p1, lambda p: p // d)
        self.shift_pending = True

    def op_save(self) -> None:
        self.snapshot = [(state_bytes(run.ctx, None), copy.deepcopy(model)) for run, model in self.both()]

    def op_restore(self) -> None:
        for (run, _), (data, _) in zip(self.both(), self.snapshot, strict=True):
            load_state(run.ctx, data, None)
        self.model_comp, self.model_exact = (copy.deepcopy(model) for _, model in self.snapshot)
        self.seen["restored blocks"] += bool(self.model_comp.blocks)
        self.shift_pending = False

    def op_save_seq(self, seq: int) -> None:
        self.seq_snapshot = [(state_bytes(run.ctx, seq), model.save_seq(seq)) for run, model in self.both()]

    def op_restore_seq(self, dst: int) -> None:
        for (run, model), (data, saved) in zip(self.both(), self.seq_snapshot, strict=True):
            load_state(run.ctx, data, dst)
            model.load_seq(dst, saved)
        self.seen["restored blocks"] += bool(self.seq_snapshot[0][1][1])

    # -- the checks after every operation --
    def check(self) -> None:
        B = self.config.block_tokens
        for seq in range(N_SEQ_MAX):
            held = self.model_exact.positions(seq)
            if self.model_comp.positions(seq) != held:
                raise Mismatch("model", f"sequence {seq}: the two models hold different positions")
            want = (held[0], held[-1]) if held else (-1, -1)
            for name, run in (("compressed", self.comp), ("exact", self.exact)):
                got = (
                    llama_cpp.llama_memory_seq_pos_min(run.memory, seq),
                    llama_cpp.llama_memory_seq_pos_max(run.memory, seq),
                )
                if got != want:
                    raise Mismatch("positions", f"{name} sequence {seq}: (pos_min, pos_max) {got}, expected {want}")
            self.checks["positions"] += 1

            segments = native.get_segments(self.comp.ctx, seq)
            got = sorted((s["p0"], s["p1"], s["n_tokens"], s["step"]) for s in segments)
            want = self.model_comp.segments(seq)
            if got != want:
                raise Mismatch("segments", f"sequence {seq}: [p0, p1, n_tokens, step] {got}, expected {want}")
            ladder = self.config.ladder()
            preset = role_bits(self.config.preset, self.config.level)[0]  # segments report K's widths
            for s in segments:
                bits = preset if s["step"] == 0 else tuple(map(min, ladder[s["step"] - 1].bits, preset))
                if tuple(s["bits"]) != bits:
                    raise Mismatch("segments", f"sequence {seq}: block {s['p0']}..{s['p1']} widths {s['bits']}")
            self.checks["segments"] += 1

            slots = self.model_comp.slots(seq)
            if native.get_step_map(self.comp.ctx, seq) != slots:
                raise Mismatch("bitmaps", f"sequence {seq}: step map {native.get_step_map(self.comp.ctx, seq)}")
            if native.get_bitmap(self.comp.ctx, seq) != [k > 0 for k in slots]:
                raise Mismatch("bitmaps", f"sequence {seq}: bitmap {native.get_bitmap(self.comp.ctx, seq)}")
            self.checks["bitmaps"] += 1
            self.seen["cut blocks"] += any(n < B for _, _, n, _ in want)
            self.seen["coarsened blocks"] += any(step > 0 for *_, step in want)
            self.seen["dropped subbands"] += any(0 in s["bits"] for s in segments)
        stats = native.get_stats(self.comp.ctx)
        alive = sum(len(b.alive()) for b in self.model_comp.blocks)
        if (stats["compressed_tokens"], stats["blocks"]) != (alive, len(self.model_comp.blocks)):
            raise Mismatch("segments", f"stats {stats['compressed_tokens']} tokens in {stats['blocks']} blocks")
        self.seen["shared cells"] += any(len(c.seqs) > 1 for c in self.model_comp.cells)


class Generator:
    """Draws the next operations from the harness's models, so that they are valid."""

    def __init__(self, rng: np.random.Generator, harness: Harness):
        self.rng, self.h = rng, harness
        self.n_seq = int(rng.integers(1, N_SEQ_MAX + 1))
        self.cursor = [int(rng.integers(0, len(TEXT) // 2)) for _ in range(N_SEQ_MAX)]  # text each sequence reads

    def seq(self) -> int:
        return int(self.rng.integers(self.n_seq))

    def live(self) -> list[int]:
        return [s for s in range(self.n_seq) if self.h.model_exact.positions(s)]

    def range_of(self, seq: int) -> tuple[int, int]:
        """A range of the sequence's positions: short, a tail, a prefix, or one cutting a compressed block."""
        held = self.h.model_exact.positions(seq)
        lo, hi = (held[0], held[-1] + 1) if held else (0, 1)
        p0 = int(self.rng.integers(lo, hi + 1))
        kind = self.rng.choice(["short", "tail", "prefix", "block"], p=[0.4, 0.25, 0.15, 0.2])
        blocks = [b for b in self.h.model_comp.blocks if b.seq == seq and b.end() - b.first() > 1]
        if kind == "block" and blocks:
            b = blocks[int(self.rng.integers(len(blocks)))]
            p0 = int(self.rng.integers(b.first() + 1, b.end()))
            return p0, p0 + int(self.rng.integers(1, 40))
        if kind == "tail":
            return p0, -1
        if kind == "prefix":
            return -1, p0
        return p0, p0 + int(self.rng.integers(1, 33))

    def draw(self) -> list[list]:
        h, rng = self.h, self.rng
        full = max(len(h.model_comp.cells) / h.capacity, len(h.model_exact.cells) / N_CTX)
        kinds = ["decode", "rm", "cp", "keep", "add", "div", "save", "restore", "save_seq", "restore_seq"]
        weights = np.array([30, 12 + 40 * (full > 0.6), 8, 1, 8, 3, 2, 2, 3, 3], dtype=float)
        weights *= [1 + 4 * (h.ops[kind] == 0) for kind in kinds]  # a short run still reaches every kind
        for _ in range(100):
            kind = str(rng.choice(kinds, p=weights / weights.sum()))
            ops = getattr(self, "draw_" + kind)()
            if ops and all(h.valid(op) for op in ops[:1]):
                if rng.random() < 0.3 and self.live():
                    ops.append(self.probe(int(rng.choice(self.live()))))
                return ops
        return [["rm", -1, -1, -1]]  # nothing else fits: start over

    def probe(self, seq: int) -> list:
        return ["probe", seq, self.cursor[seq]]

    def draw_decode(self) -> list[list]:
        seq = self.seq()
        lo, hi = [(1, 25), (25, 97), (97, 201)][self.rng.choice(3, p=[0.7, 0.25, 0.05])]  # mostly a turn, some reads
        n = int(self.rng.integers(lo, hi))
        if not self.h.model_exact.positions(seq):
            self.cursor[seq] = int(self.rng.integers(0, len(TEXT) // 2))  # a new sequence reads other text
        op = ["decode", seq, self.cursor[seq], n]
        self.cursor[seq] += n
        return [op]

    def draw_rm(self) -> list[list]:
        seq = -1 if self.rng.random() < 0.1 else self.seq()
        return [["rm", seq, *self.range_of(max(seq, 0))]]

    def draw_cp(self) -> list[list]:
        src = self.seq()
        others = [s for s in range(self.n_seq) if s != src]
        dst = int(self.rng.choice(others)) if others else src  # onto itself: a regression (tests) covers it
        p0, p1 = (-1, -1) if self.rng.random() < 0.3 else self.range_of(src)
        if dst != src:
            self.cursor[dst] = self.cursor[src] + 1000  # the copy goes on with text of its own
        return [["cp", src, dst, p0, p1]]

    def draw_keep(self) -> list[list]:
        return [["keep", self.seq()]]

    def draw_add(self) -> list[list]:
        seq = self.seq()
        held = self.h.model_exact.positions(seq)
        if not held:
            return []
        if self.rng.random() < 0.5:
            # llama.cpp's context shift: drop [a, b), move the rest down by b - a; mostly, as llama.cpp
            # does, right after the first few tokens (its n_keep), so that the compressed blocks move
            keep = held[0] + int(self.rng.integers(1, 8))
            a = keep if self.rng.random() < 0.6 else int(self.rng.integers(held[0], held[-1] + 1))
            b = a + int(self.rng.integers(1, 65))
            return [["rm", seq, a, b], ["add", seq, b, -1, a - b]]
        p0, p1 = self.range_of(seq)
        delta = int(self.rng.integers(-48, 49)) or 1
        return [["add", seq, p0, p1, delta]]

    def draw_div(self) -> list[list]:
        seq = self.seq()
        if not self.h.model_exact.positions(seq):
            return []
        return [["div", seq, *self.range_of(seq), int(self.rng.integers(2, 4))]]

    def draw_save(self) -> list[list]:
        return [["save"]]

    def draw_restore(self) -> list[list]:
        return [["restore"]]

    def draw_save_seq(self) -> list[list]:
        live = self.live()
        return [["save_seq", int(self.rng.choice(live))]] if live else []

    def draw_restore_seq(self) -> list[list]:
        return [["restore_seq", self.seq()]]


def replay(
    variant: str, ops: list[list], tolerance: dict[str, float], fault: str | None = None
) -> tuple[Harness, dict | None]:
    """Apply ops in order (skipping those not valid there); the harness, and the failure if one."""
    h = Harness(variant, tolerance, fault)
    try:
        for step, op in enumerate(ops):
            try:
                h.apply(op)
            except Mismatch as err:
                return h, {"step": step, "op": op, "check": err.check, "message": str(err), **err.details}
        return h, None
    finally:
        h.close()


def run_seed(
    variant: str, seed: int, n_ops: int, tolerance: dict[str, float], fault: str | None
) -> tuple[Harness, list, dict | None]:
    rng = np.random.default_rng(seed)
    h = Harness(variant, tolerance, fault)
    gen = Generator(rng, h)
    ops: list[list] = []
    try:
        while len(ops) < n_ops:
            batch = gen.draw()
            if len(ops) % 25 == 24:  # now and then, every live sequence
                batch += [gen.probe(s) for s in gen.live()]
            for op in batch:
                ops.append(op)
                try:
                    h.apply(op)
                except Mismatch as err:
                    return (
                        h,
                        ops,
                        {"step": len(ops) - 1, "op": op, "check": err.check, "message": str(err), **err.details},
                    )
        return h, ops, None
    finally:
        h.close()


def shrink(
    variant: str, ops: list[list], check: str, tolerance: dict[str, float], fault: str | None, budget_s: float
) -> list[list]:
    """Delta debugging: drop chunks of operations while the same check still fails; the shortest list
    found when budget_s seconds are spent."""
    deadline = time.time() + budget_s

    def fails(candidate: list[list]) -> bool:
        return (replay(variant, candidate, tolerance, fault)[1] or {}).get("check") == check

    n = 2
    while len(ops) >= 2 and time.time() < deadline:
        size = -(-len(ops) // n)
        for i in range(0, len(ops), size):
            candidate = ops[:i] + ops[i + size :]
            if fails(candidate):
                ops, n = candidate, max(n - 1, 2)
                break
        else:
            if n >= len(ops):
                break
            n = min(2 * n, len(ops))
    return ops


def parse_seeds(text: str) -> list[int]:
    """'3' or '0-9' or '1,4,7'."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> None:
    global THREADS, TEXT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="preset")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--ops", type=int, default=100, help="operations per seed")
    ap.add_argument("--replay", help="a JSON list of operations to run instead of random ones")
    ap.add_argument("--shrink-budget", type=float, default=900, help="seconds to shrink a failure (0: do not)")
    ap.add_argument("--fault", choices=["reverse"], help="make the compressed context read one decode backwards")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    THREADS = args.threads
    t0 = time.time()
    with context(args.variant, False) as run:
        TEXT = run.tokenize(default_text())
    base = baseline(args.variant)
    tolerance = {regime: TOLERANCE_FACTOR * kld for regime, kld in base.items()}
    report: dict = {"variant": args.variant, "baseline_kld": base, "tolerance": tolerance, "failures": []}
    totals: dict[str, Counter] = {"ops": Counter(), "checks": Counter(), "seen": Counter()}
    klds: dict[str, list[float]] = {regime: [] for regime in REGIMES}

    def record(h: Harness) -> None:
        totals["ops"].update(h.ops)
        totals["checks"].update(h.checks)
        totals["seen"].update(h.seen)
        for regime in REGIMES:
            klds[regime] += h.klds[regime]

    if args.replay:
        h, failure = replay(args.variant, json.loads(args.replay), tolerance, args.fault)
        record(h)
        report["failures"] += [failure] if failure else []
        report["seeds"] = []
    else:
        report["seeds"] = parse_seeds(args.seeds)
        for seed in report["seeds"]:
            h, ops, failure = run_seed(args.variant, seed, args.ops, tolerance, args.fault)
            record(h)
            outcome = "FAILED " + failure["message"] if failure else "ok"
            print(f"seed {seed}: {sum(h.ops.values())} operations, {outcome}", file=sys.stderr, flush=True)
            if failure:
                failure["seed"] = seed
                if args.shrink_budget > 0:
                    failure["shrunk"] = shrink(
                        args.variant,
                        ops[: failure["step"] + 1],
                        failure["check"],
                        tolerance,
                        args.fault,
                        args.shrink_budget,
                    )
                report["failures"].append(failure)
    report.update(
        operations=sum(totals["ops"].values()),
        per_op=dict(sorted(totals["ops"].items())),
        checks=dict(sorted(totals["checks"].items())),
        seen=dict(sorted(totals["seen"].items())),
        probes={regime: len(k) for regime, k in klds.items()},
        max_kld={regime: max(k, default=0.0) for regime, k in klds.items()},
        seconds=round(time.time() - t0, 1),
    )
    print(json.dumps(report))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
