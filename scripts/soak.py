#!/usr/bin/env python3
"""Soak and load: hours of use in minutes, watching memory and the library's own accounting.

    soak.py generate [--tokens 20000] [--ctx 8192]
        one long generation on the default model through kvggml's Runner, compression on, past
        n_ctx by llama.cpp's context shift (keep the sinks, drop half of the rest, move the
        remainder down). Every token: the counters of kvggml_get_stats must add up (below); every
        --sample-every tokens: RSS (VmRSS) and the segments. Set OLLAMA_KV_COMPRESSION_BUDGET
        (e.g. 0.25) to run it under a budget.
    soak.py load [--seconds 600] [--clients 4] [--engine llama-cpp-python|llama-server]
        starts `kvggml serve` (compression on with a small threshold so requests cross it, or
        off with --no-compression as a baseline; with --engine llama-server, llama.cpp's server
        with one slot per client) and sends it mixed requests from --clients threads: chat and
        completions, streamed or not, of varied lengths, multi-turn chats, kvggml's /metrics,
        and malformed ones that must get an error status. Samples the server's RSS and open
        file descriptors.

Each prints a table and writes JSON (results/soak-*.json), and exits 1 when a check failed: a
counter that does not add up, RSS that grew past --rss-slack-mib once warm, an error or a crash.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvggml import native  # noqa: E402
from kvggml.config import CompressionConfig  # noqa: E402

MIB = 2**20


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2, every arena: uordblks + hblkhd);
    None without glibc 2.33+. RSS that grows while this stays flat is memory malloc keeps for reuse,
    not a leak."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Failures:
    """Checks that failed, each counted, the first few of each kept with their details."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        if not ok:
            self.counts[name] += 1
            examples = self.examples.setdefault(name, [])
            if len(examples) < 5:
                examples.append(detail)
        return ok

    def report(self) -> dict:
        return {name: {"count": n, "examples": self.examples[name]} for name, n in self.counts.items()}


def table(rows: list[tuple[str, object]]) -> str:
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


#
# generate
#


class Ledger:
    """What the compress callback and the context shifts did, to check the library's totals against.

    Counts, and the step of each block held (no events kept), so the soak's own memory stays flat.
    """

    def __init__(self, per_head: bool = False):
        # with guidance each head steps on its own: coarsenings counts head steps, while an event
        # reports its block's furthest head, so the events bound the count from below
        self.per_head = per_head
        self.encoded = 0  # blocks encoded (events of step 0)
        self.coarsened = 0  # hierarchy steps, summed over the coarsening events
        self.freed_blocks = 0  # blocks the shifts removed
        self.removed_tokens = 0  # compressed tokens the shifts removed
        self.shifts = 0
        self.steps: dict[tuple[int, int], int] = {}  # (seq_id, p0) -> the step its last event reported

    def on_compress(self, event: dict) -> None:
        block = (event["seq_id"], event["p0"])
        if event["step"] == 0:
            self.encoded += 1
        else:
            # one event per block and pass: under a budget a pass can take a block several steps
            self.coarsened += event["step"] - self.steps[block]
        self.steps[block] = event["step"]

    def shifted(self, segments: list[dict]) -> None:
        """After a context shift: the blocks still held, at their new positions."""
        self.steps = steps_of(segments)


def steps_of(segments: list[dict]) -> dict[tuple[int, int], int]:
    """(seq_id, p0) -> hierarchy step of each block the segments list."""
    return {(s["seq_id"], s["p0"]): s["step"] for s in segments}


def check_stats(
    stats: dict, last: dict | None, n_past: int, settings: dict, ledger: Ledger, failures: Failures
) -> None:
    """What the design guarantees after every llama_decode, for one sequence whose only removals are
    context shifts that keep the sinks and drop more than a block (kvggml/csrc/tier*.cpp)."""
    block, sinks, threshold = 2 ** settings["level"], settings["sinks"], settings["threshold"]
    where = f"at position {n_past}"
    # compress(): every whole block between the sinks and the window is encoded, oldest first, so
    # fewer than a block of old tokens stays exact; compressed tokens are the oldest ones.
    old = max(n_past - sinks - threshold, 0)
    failures.check(
        old - block < stats["compressed_tokens"] <= old or old == stats["compressed_tokens"] == 0,
        "compressed tokens: fewer than a block of old tokens exact",
        f"{where}: {stats['compressed_tokens']} compressed of {old} old tokens",
    )
    # a shift's cut falls inside at most one block, which the next shift removes whole
    held = stats["blocks"] * block
    failures.check(
        0 <= held - stats["compressed_tokens"] < block,
        "blocks: at most one partly removed",
        f"{where}: {stats['blocks']} blocks of {block} hold {stats['compressed_tokens']} tokens",
    )
    failures.check(
        stats["blocks"] == ledger.encoded - ledger.freed_blocks,
        "blocks: encoded - freed",
        f"{where}: {stats['blocks']} blocks, {ledger.encoded} encoded, {ledger.freed_blocks} freed",
    )
    failures.check(
        ledger.encoded * block == stats["compressed_tokens"] + ledger.removed_tokens,
        "tokens: encoded = compressed + removed",
        f"{where}: {ledger.encoded} blocks encoded, {stats['compressed_tokens']} tokens held, "
        f"{ledger.removed_tokens} removed",
    )
    failures.check(
        stats["coarsenings"] >= ledger.coarsened if ledger.per_head else stats["coarsenings"] == ledger.coarsened,
        "coarsenings: the steps the events reported" + (" (at least, with guidance)" if ledger.per_head else ""),
        f"{where}: {stats['coarsenings']} counted, {ledger.coarsened} reported",
    )
    if stats["budget_bytes"]:
        total = stats["exact_bytes"] + stats["compressed_bytes"]
        failures.check(
            total <= stats["budget_bytes"],
            "budget: exact + compressed bytes within it",
            f"{where}: {total} bytes, budget {stats['budget_bytes']}",
        )
    if last is not None:
        for name in ("encode_us", "decode_us", "coarsenings"):
            failures.check(
                stats[name] >= last[name], f"{name}: never decreases", f"{where}: {last[name]} -> {stats[name]}"
            )


def check_segments(segments: list[dict], stats: dict, settings: dict, failures: Failures, where: str) -> None:
    """The segments are the stats' blocks, contiguous from the sinks on."""
    failures.check(
        len(segments) == stats["blocks"]
        and sum(s["n_tokens"] for s in segments) == stats["compressed_tokens"]
        and sum(s["bytes"] for s in segments) == stats["compressed_bytes"],
        "segments: sum to the stats",
        f"{where}: {len(segments)} segments, {sum(s['n_tokens'] for s in segments)} tokens, "
        f"{sum(s['bytes'] for s in segments)} bytes; stats {stats}",
    )
    if segments:
        bounds = [(s["p0"], s["p1"]) for s in segments]
        contiguous = bounds[0][0] == settings["sinks"] and all(a[1] == b[0] for a, b in pairwise(bounds))
        failures.check(contiguous, "segments: contiguous from the sinks", f"{where}: {bounds[:4]}...")


def sample_token(logits: np.ndarray, rng: np.random.Generator, top_k: int, temperature: float) -> int:
    """Top-k sampling: greedy decoding of a small model falls into a loop, which would soak one path only."""
    top = np.argpartition(logits, -top_k)[-top_k:]
    weights = np.exp((logits[top] - logits[top].max()) / temperature)
    return int(rng.choice(top, p=weights / weights.sum()))


def cmd_generate(args: argparse.Namespace) -> int:
    os.environ["OLLAMA_KV_COMPRESSION"] = "1"
    config = CompressionConfig.from_env()  # a bad variable fails here, with its message
    from kvggml.library import load_llama_cpp
    from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs

    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)

    failures, ledger, samples = Failures(), Ledger(config.guidance), []
    rss_start = rss_bytes()
    run = Runner(llama_cpp, default_model_path(), n_ctx=args.ctx, n_batch=args.batch, n_threads=args.threads)
    with run:
        if not llama_cpp.llama_memory_can_shift(run.memory):
            raise RuntimeError("this context cannot shift: the soak needs llama.cpp's context shift")
        callback = native.CompressCallback(run.ctx, ledger.on_compress)
        settings = native.get_settings(run.ctx)
        rss_context = rss_bytes()
        rng = np.random.default_rng(args.seed)
        prompt = run.tokenize(default_text())[: args.prompt]
        run.decode(prompt[:-1], 0)
        logits = run.decode(prompt[-1:], len(prompt) - 1, want_logits=True)[-1]
        n_past, last, rss_filled, filled_at = len(prompt), None, None, None
        t0 = time.monotonic()

        def sample(generated: int, stats: dict) -> None:
            samples.append(
                {
                    "generated": generated,
                    "seconds": round(time.monotonic() - t0, 1),
                    "n_past": n_past,
                    "rss": rss_bytes(),
                    "heap_in_use": heap_in_use(),
                    **{k: stats[k] for k in ("blocks", "compressed_tokens", "compressed_bytes", "coarsenings")},
                }
            )
            segments = native.get_segments(run.ctx, 0)
            check_segments(segments, stats, settings, failures, f"at token {generated}")
            held = steps_of(segments)
            failures.check(
                held == ledger.steps,
                "segments: each block at the step its last event reported",
                f"at token {generated}: {sorted(set(held.items()) ^ set(ledger.steps.items()))[:4]}",
            )

        progress = tqdm(range(1, args.tokens + 1), desc="generate", unit="tok", mininterval=2)
        for generated in progress:
            if n_past == args.ctx:
                if rss_filled is None:  # the cache is full: from here on memory should stay flat
                    rss_filled, filled_at = rss_bytes(), generated
                # llama.cpp's context shift (tools/main): keep n_keep, drop half of the rest
                n_keep = settings["sinks"]
                n_discard = (n_past - n_keep) // 2
                before = native.get_stats(run.ctx)
                run.remove(n_keep, n_keep + n_discard)
                after = native.get_stats(run.ctx)
                llama_cpp.llama_memory_seq_add(run.memory, 0, n_keep + n_discard, n_past, -n_discard)
                ledger.freed_blocks += before["blocks"] - after["blocks"]
                ledger.removed_tokens += before["compressed_tokens"] - after["compressed_tokens"]
                ledger.shifts += 1
                ledger.shifted(native.get_segments(run.ctx, 0))
                n_past -= n_discard
            token = sample_token(logits, rng, args.top_k, args.temperature)
            logits = run.decode(np.array([token]), n_past, want_logits=True)[-1]
            n_past += 1
            stats = native.get_stats(run.ctx)
            check_stats(stats, last, n_past, settings, ledger, failures)
            last = stats
            if generated % args.sample_every == 0 or generated == args.tokens:
                sample(generated, stats)
                progress.set_postfix(rss=f"{samples[-1]['rss'] / MIB:.0f}MiB", blocks=stats["blocks"], refresh=False)
        seconds = time.monotonic() - t0
        failures.check(not callback.errors, "callback: no exception", str(callback.errors[:3]))
        callback.close()
        final = native.get_stats(run.ctx)
    rss_end = samples[-1]["rss"]
    after_fill = [s["rss"] for s in samples if rss_filled is not None and s["generated"] >= filled_at]
    growth = rss_end - rss_filled if rss_filled is not None else None
    failures.check(rss_filled is not None, "the cache filled", f"{args.tokens} tokens never reached n_ctx {args.ctx}")
    if rss_filled is not None:
        failures.check(
            max(after_fill) - rss_filled <= args.rss_slack_mib * MIB,
            "RSS: flat once the cache filled",
            f"{rss_filled / MIB:.1f} MiB when it filled, at most {max(after_fill) / MIB:.1f} MiB after",
        )
    report = {
        "command": "generate",
        "configuration": config.to_env(),
        "n_ctx": args.ctx,
        "settings": settings,
        "prompt_tokens": len(prompt),
        "generated": args.tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(args.tokens / seconds, 2),
        "shifts": ledger.shifts,
        "filled_at_token": filled_at,
        "rss_mib": {
            "start": rss_start / MIB,
            "context": rss_context / MIB,
            "filled": rss_filled / MIB if rss_filled else None,
            "end": rss_end / MIB,
            "max_after_fill": max(after_fill) / MIB if after_fill else None,
            "growth_after_fill": growth / MIB if growth is not None else None,
        },
        "stats": final,
        "ledger": {k: v for k, v in vars(ledger).items() if k != "steps"},
        "checks": {
            "per_token": args.tokens,
            "segment_samples": len(samples),
            "failed": failures.report(),
        },
        "samples": samples,
    }
    print(
        table(
            [
                ("generated tokens", f"{args.tokens} in {seconds:.0f} s ({args.tokens / seconds:.1f} tok/s)"),
                ("n_ctx, prompt, shifts", f"{args.ctx}, {len(prompt)}, {ledger.shifts}"),
                ("budget", f"{final['budget_bytes'] / MIB:.1f} MiB" if final["budget_bytes"] else "none"),
                ("RSS start / context", f"{rss_start / MIB:.1f} / {rss_context / MIB:.1f} MiB"),
                (
                    "RSS filled (token) / end",
                    f"{rss_filled / MIB:.1f} ({filled_at}) / {rss_end / MIB:.1f} MiB" if rss_filled else "never filled",
                ),
                ("RSS max after fill, growth", _growth(after_fill, rss_filled, growth)),
                ("malloc in use, filled / end", _heap(samples, filled_at)),
                ("blocks encoded / freed / held", f"{ledger.encoded} / {ledger.freed_blocks} / {final['blocks']}"),
                (
                    "tokens encoded = held + removed",
                    f"{ledger.encoded * 2 ** settings['level']} = {final['compressed_tokens']} + "
                    f"{ledger.removed_tokens}",
                ),
                ("hierarchy steps (stats / events)", f"{final['coarsenings']} / {ledger.coarsened}"),
                ("KV now: exact + compressed", f"{(final['exact_bytes'] + final['compressed_bytes']) / MIB:.1f} MiB"),
                (
                    "blocks' storage: encoded / allocated",
                    f"{final['compressed_bytes'] / MIB:.1f} / {final['allocated_bytes'] / MIB:.1f} MiB",
                ),
                ("checks", f"{args.tokens} per token, {len(samples)} segment samples"),
                ("failed checks", ", ".join(f"{k} ({v})" for k, v in failures.counts.items()) or "none"),
            ]
        )
    )
    write_json(
        Path(args.out or REPO / "results" / f"soak-generate{'-budget' if config.budget != (0, 0.0) else ''}.json"),
        report,
    )
    return 1 if failures.counts else 0


def _heap(samples: list[dict], filled_at: int | None) -> str:
    """The heap malloc has handed out, at the first sample after the fill and at the end."""
    at_fill = next((s for s in samples if filled_at is not None and s["generated"] >= filled_at), None)
    if at_fill is None or at_fill["heap_in_use"] is None:
        return "not measured (needs glibc 2.33+ and a filled cache)"
    return f"{at_fill['heap_in_use'] / MIB:.1f} / {samples[-1]['heap_in_use'] / MIB:.1f} MiB"


def _growth(after_fill: list[int], filled: int | None, growth: int | None) -> str:
    if filled is None:
        return "-"
    return f"{max(after_fill) / MIB:.1f} MiB, {growth / MIB:+.1f} MiB"


#
# load
#


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: bytes | dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    """(status, body) of a GET, or a POST of body; an HTTP error status is returned, not raised."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def sse_chunks(raw: bytes) -> list[dict]:
    """The JSON events of a server-sent stream, which must end with [DONE]."""
    events = [line[len(b"data: ") :] for line in raw.splitlines() if line.startswith(b"data: ")]
    if not events or events[-1].strip() != b"[DONE]":
        raise ValueError(f"the stream did not end with [DONE]: ...{raw[-200:]!r}")
    return [json.loads(e) for e in events[:-1]]


def metrics(url: str) -> dict[str, float]:
    """/metrics (Prometheus text) as {name: value}."""
    status, body = http(f"{url}/metrics")
    if status != 200:
        raise AssertionError(f"/metrics: status {status}: {body[:300]!r}")
    return native.parse_metrics(body.decode())


# What differs between the engines a client talks to. A body that is not JSON gets 500 from
# llama-server (llama.cpp reports the parser's exception as a server error) and 400 from kvggml serve.
ENGINES = {
    "llama-cpp-python": {"tokenize": ("/extras/tokenize", "input"), "not_json": 400},
    "llama-server": {"tokenize": ("/tokenize", "content"), "not_json": 500},
}


class Client:
    """One of the load's clients: a random mix of requests, each checked for the answer it must get.
    n_ctx is what one request may use: the context, or with llama-server a slot's share of it."""

    TOPICS = ("the sea", "mountains", "a city at night", "bread", "rivers", "the moon", "trains", "gardens")

    def __init__(self, url: str, text: str, seed: int, n_ctx: int, engine: str, compressed: bool):
        self.url, self.text, self.rng, self.n_ctx = url, text, random.Random(seed), n_ctx
        self.engine, self.compressed = ENGINES[engine], compressed
        # kind: (weight, request); the weights favour requests that run the model
        self.kinds = {
            "chat": (4, self.chat),
            "chat_stream": (3, self.chat_stream),
            "chat_multi_turn": (2, self.chat_multi_turn),
            "completion": (3, self.completion),
            "completion_stream": (2, self.completion_stream),
            "stats": (1, self.stats),
            "models": (1, self.models),
            "not_json": (1, self.not_json),
            "bad_body": (1, self.bad_body),
            "bad_field": (1, self.bad_field),
            "too_long": (1, self.too_long),
            "not_found": (1, self.not_found),
        }

    def pick(self) -> str:
        names = list(self.kinds)
        return self.rng.choices(names, weights=[self.kinds[n][0] for n in names])[0]

    def expect(self, status: int, body: bytes, want: int) -> bytes:
        if status != want:
            raise AssertionError(f"status {status}, expected {want}: {body[:300]!r}")
        return body

    def question(self) -> str:
        return f"Write {self.rng.randint(1, 4)} sentences about {self.rng.choice(self.TOPICS)}."

    def passage(self, max_chars: int) -> str:
        start = self.rng.randrange(0, len(self.text) - max_chars)
        return self.text[start : start + self.rng.randint(max_chars // 8, max_chars)]

    def chat(self) -> None:
        body = {"messages": [{"role": "user", "content": self.question()}], "max_tokens": self.rng.randint(8, 64)}
        reply = json.loads(self.expect(*http(f"{self.url}/v1/chat/completions", body), 200))
        assert isinstance(reply["choices"][0]["message"]["content"], str), reply

    def chat_stream(self) -> None:
        body = {"messages": [{"role": "user", "content": self.question()}], "max_tokens": 48, "stream": True}
        chunks = sse_chunks(self.expect(*http(f"{self.url}/v1/chat/completions", body), 200))
        assert chunks and all("choices" in c for c in chunks), chunks[:2]

    def chat_multi_turn(self) -> None:
        # a long first message (up to ~1000 tokens), so the conversation crosses the threshold and compresses
        messages = [{"role": "user", "content": f"Read this:\n{self.passage(4000)}\n\nSummarise it in one sentence."}]
        for _ in range(self.rng.randint(2, 3)):
            body = {"messages": messages, "max_tokens": 32, "temperature": 0}
            reply = json.loads(self.expect(*http(f"{self.url}/v1/chat/completions", body), 200))
            messages += [reply["choices"][0]["message"], {"role": "user", "content": self.question()}]

    def completion(self) -> None:
        body = {"prompt": self.passage(3000), "max_tokens": self.rng.randint(8, 48)}
        reply = json.loads(self.expect(*http(f"{self.url}/v1/completions", body), 200))
        assert isinstance(reply["choices"][0]["text"], str), reply

    def completion_stream(self) -> None:
        body = {"prompt": self.passage(2000), "max_tokens": 32, "stream": True}
        chunks = sse_chunks(self.expect(*http(f"{self.url}/v1/completions", body), 200))
        assert chunks and all("choices" in c for c in chunks), chunks[:2]

    def longest(self) -> None:
        """A completion of a prompt that fills the context but for 64 tokens (sized with /extras/tokenize)."""
        prompt, room = self.text[: self.n_ctx * 8], self.n_ctx - 64
        path, field = self.engine["tokenize"]
        while (n := len(json.loads(self.expect(*http(f"{self.url}{path}", {field: prompt}), 200))["tokens"])) > room:
            prompt = prompt[: int(len(prompt) * room / n * 0.98)]
        reply = json.loads(self.expect(*http(f"{self.url}/v1/completions", {"prompt": prompt, "max_tokens": 32}), 200))
        assert reply["usage"]["prompt_tokens"] > room * 0.9, reply["usage"]

    def stats(self) -> None:
        held = metrics(self.url)
        assert held["kvggml:enabled"] == self.compressed, held
        assert held["kvggml:blocks"] * 16 >= held["kvggml:compressed_tokens"], held

    def models(self) -> None:
        assert json.loads(self.expect(*http(f"{self.url}/v1/models"), 200))["data"]

    # malformed requests: 400, as OpenAI's API answers them (kvggml serve's answer_client_errors)
    def not_json(self) -> None:
        self.expect(*http(f"{self.url}/v1/chat/completions", b'{"messages": [{"role": '), self.engine["not_json"])

    def bad_body(self) -> None:
        body = {"messages": "not a list", "max_tokens": 8}
        self.expect(*http(f"{self.url}/v1/chat/completions", body), 400)

    def bad_field(self) -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": "warm"}
        self.expect(*http(f"{self.url}/v1/chat/completions", body), 400)

    def too_long(self) -> None:
        # more tokens than the context holds: refused with a 400
        body = {"prompt": "lorem ipsum " * self.n_ctx, "max_tokens": 8}
        self.expect(*http(f"{self.url}/v1/completions", body), 400)

    def not_found(self) -> None:
        self.expect(*http(f"{self.url}/v1/no-such-endpoint", {"x": 1}), 404)


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        try:
            if http(f"{url}/v1/models", timeout=5)[0] == 200:  # llama-server answers 503 while loading
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)


def warm_up(client: Client, failures: Failures) -> None:
    """Each kind of request once, then the longest prompt the context takes. llama.cpp and
    llama-cpp-python keep buffers sized for the longest prompt they have seen (RSS grows by about
    300 KiB per token of it, compression on or off), so the load's RSS counts from here."""
    for kind, (_, request) in [*client.kinds.items(), ("longest", (0, client.longest))]:
        try:
            request()
        except Exception as err:
            failures.check(False, f"warm-up {kind}: {type(err).__name__}", str(err))


def cmd_load(args: argparse.Namespace) -> int:
    from kvggml.model import default_text

    text = default_text()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.ctx = args.ctx or 2048 * (args.clients if args.engine == "llama-server" else 1)
    off = "-off" if args.no_compression else ""
    out = Path(args.out or REPO / "results" / f"soak-load-{args.engine}{off}.json")
    log = out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OLLAMA_KV_COMPRESSION_THRESHOLD": str(args.threshold)}
    cmd = [sys.executable, "-m", "kvggml.cli", "serve", "--port", str(port), "--ctx", str(args.ctx)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--no-compression"] if args.no_compression else []
    n_ctx = args.ctx  # what one request may use
    prompt_cache_mib = args.cache_ram if args.engine == "llama-server" else 0
    if args.engine == "llama-server":  # one slot per client, each with its share of the context
        # llama-server keeps slots' states in RAM for later prompts (its prompt cache, up to --cache-ram):
        # capped, so that the RSS check can tell that cache from a leak
        cmd += ["--engine", "llama-server", "--", "-np", str(args.clients), "--metrics", "-cram", str(args.cache_ram)]
        n_ctx = args.ctx // args.clients
    with open(log, "w") as server_log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT)
    failures, served, latencies, samples = Failures(), Counter(), {}, []
    lock, stop = threading.Lock(), threading.Event()
    try:
        wait_for_server(url, proc, log)
        t0 = time.monotonic()

        def sample() -> dict:
            point = {"seconds": round(time.monotonic() - t0, 1), "rss": rss_bytes(proc.pid), "fds": open_fds(proc.pid)}
            samples.append(point)
            return point

        start = sample()
        print("warm-up: each kind of request once, then the longest prompt", file=sys.stderr, flush=True)
        warm_up(Client(url, text, args.seed - 1, n_ctx, args.engine, not args.no_compression), failures)
        warm = sample()  # buffers for the longest prompt are allocated: from here on RSS should stay flat
        t_load = time.monotonic()

        def client(index: int) -> None:
            me = Client(url, text, args.seed + index, n_ctx, args.engine, not args.no_compression)
            while not stop.is_set():
                kind = me.pick()
                began = time.monotonic()
                try:
                    me.kinds[kind][1]()
                    with lock:
                        served[kind] += 1
                        latencies.setdefault(kind, []).append(time.monotonic() - began)
                except Exception as err:  # every failure is counted and shown, then the client goes on
                    failures.check(False, f"{kind}: {type(err).__name__}", f"{time.monotonic() - t_load:.0f} s: {err}")

        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in clients:
            thread.start()
        with tqdm(total=args.seconds, desc="load", unit="s", mininterval=2) as progress:
            while (elapsed := time.monotonic() - t_load) < args.seconds and proc.poll() is None:
                time.sleep(min(args.sample_every, max(args.seconds - elapsed, 0.1)))
                point = sample()
                progress.n = round(min(time.monotonic() - t_load, args.seconds))
                progress.set_postfix(
                    served=sum(served.values()),
                    errors=sum(failures.counts.values()),
                    rss=f"{point['rss'] / MIB:.0f}MiB",
                )
        stop.set()
        for thread in clients:
            thread.join(timeout=900)
        failures.check(proc.poll() is None, "server: alive to the end", f"exited with {proc.returncode}")
        time.sleep(2)  # connections closed, requests finished
        end = sample() if proc.poll() is None else samples[-1]
        final_stats = metrics(url) if proc.poll() is None else None
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    failures.check(
        end["rss"] - warm["rss"] <= (args.rss_slack_mib + prompt_cache_mib) * MIB,
        "server RSS: stable once warm",
        f"{warm['rss'] / MIB:.1f} MiB after the warm-up, {end['rss'] / MIB:.1f} MiB at the end",
    )
    failures.check(
        end["fds"] <= start["fds"] + args.fd_slack,
        "server file descriptors: stable",
        f"{start['fds']} at the start, {end['fds']} at the end",
    )
    errors = sum(failures.counts.values())
    report = {
        "command": "load",
        "engine": args.engine,
        "compression": not args.no_compression,
        "seconds": args.seconds,
        "clients": args.clients,
        "n_ctx": args.ctx,
        "threshold": args.threshold,
        "served": dict(served),
        "served_total": sum(served.values()),
        "median_seconds": {k: round(float(np.median(v)), 2) for k, v in latencies.items()},
        "errors": errors,
        "failed": failures.report(),
        "rss_mib": {
            "start": start["rss"] / MIB,
            "warm": warm["rss"] / MIB,
            "end": end["rss"] / MIB,
            "max": max(s["rss"] for s in samples) / MIB,
        },
        "fds": {"start": start["fds"], "warm": warm["fds"], "end": end["fds"], "max": max(s["fds"] for s in samples)},
        "server_exit": proc.returncode,
        "final_stats": final_stats,
        "samples": samples,
    }
    rows = [
        (f"served: {kind}", f"{n} (median {report['median_seconds'][kind]} s)") for kind, n in sorted(served.items())
    ]
    print(
        table(
            [
                (
                    "engine, compression, duration, clients",
                    f"{args.engine}, {'off' if args.no_compression else 'on'}, {args.seconds} s, {args.clients}",
                ),
                ("requests served", report["served_total"]),
                *rows,
                ("errors", errors),
                (
                    "server RSS start / warm / end / max",
                    " / ".join(f"{v:.1f}" for v in report["rss_mib"].values()) + " MiB",
                ),
                ("server fds start / warm / end / max", " / ".join(str(v) for v in report["fds"].values())),
                ("failed checks", ", ".join(f"{k} ({v})" for k, v in failures.counts.items()) or "none"),
            ]
        )
    )
    write_json(out, report)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="a long generation past n_ctx, compression on")
    gen.add_argument("--tokens", type=int, default=20000, help="tokens to generate (default 20000)")
    gen.add_argument("--ctx", type=int, default=8192, help="context size (default 8192, SmolLM2's trained context)")
    gen.add_argument("--prompt", type=int, default=256, help="prompt tokens, from the default text (default 256)")
    gen.add_argument("--batch", type=int, default=512, help="micro-batch of the prompt (default 512)")
    gen.add_argument("--sample-every", type=int, default=250, help="tokens between RSS and segment samples")
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--rss-slack-mib", type=float, default=16, help="most RSS may grow once the cache filled")
    gen.set_defaults(func=cmd_generate)
    load = sub.add_parser("load", help="clients against `kvggml serve` or llama-server")
    load.add_argument("--seconds", type=float, default=600, help="how long the clients run (default 600)")
    load.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    load.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default="llama-cpp-python",
        help="kvggml serve's engine (default llama-cpp-python; llama-server: one slot per client)",
    )
    load.add_argument("--ctx", type=int, help="the server's context (default 2048; llama-server: 2048 a slot)")
    load.add_argument(
        "--cache-ram", type=int, default=128, help="llama-server's prompt cache in MiB, allowed on top of the slack"
    )
    load.add_argument("--no-compression", action="store_true", help="the same load on an exact cache, as a baseline")
    load.add_argument("--threshold", type=int, default=32, help="the server's OLLAMA_KV_COMPRESSION_THRESHOLD")
    load.add_argument("--sample-every", type=float, default=5, help="seconds between RSS and fd samples")
    load.add_argument("--rss-slack-mib", type=float, default=32, help="most the server's RSS may grow once warm")
    load.add_argument("--fd-slack", type=int, default=2, help="most the server's open fds may grow")
    load.set_defaults(func=cmd_load)
    for p in (gen, load):
        p.add_argument("--threads", type=int, default=2, help="CPU threads of llama.cpp (default 2)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="JSON report (default results/soak-<command>[-budget].json)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
