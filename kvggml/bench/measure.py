"""The bench's measurements: the cells of one measurement and one set of parameters, in processes of their own.

memory   KV bytes once a context is full (library accounting; stock: llama.cpp's allocation), peak RSS
speed    llama-bench prefill and decode tokens/s at a depth, mean and deviation over repetitions
quality  llama-perplexity: PPL, and KLD against stock f16's logits (--kl-divergence); with "last",
         the probe's logits of the last positions of each context instead (long contexts of large vocabularies)
recall   llama.cpp's passkey test: a planted key at several depths and seeds, asked for at the end
"""

from __future__ import annotations

import json
import os
import re
import selectors
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvggml.bench.probe import PROGRESS
from kvggml.bench.variants import REFERENCE, Variant
from kvggml.library import REPO

MEASUREMENTS = ("memory", "speed", "quality", "recall")
MIB = 2**20


@dataclass(frozen=True)
class Inputs:
    """What every cell of a bench reads."""

    model: Path
    text: Path
    threads: int


Progress = Callable[[str], None]  # what a group is measuring now, for the progress bar
Done = Callable[[str, dict], None]  # a variant's label and its result, as soon as it is measured
Measure = Callable[[list[Variant], dict, Inputs, Path, Progress, Done], None]  # MEASURE's functions
Watch = Callable[[str, str], str | None]  # a program's output so far (stdout, stderr) -> how far it has got


class MeasurementError(RuntimeError):
    """A llama.cpp program or a probe failed: its command and the end of its output."""


class Refused(MeasurementError):
    """The library refused the variant's settings for this cell's context: a budget below what the
    context needs (a fraction of f16 that a long context allows can be too small for a short one,
    whose exact window is a larger part of it). The cell records the library's reason."""


# the library's message (kvggml/csrc/config.cpp, init_budget) when a budget cannot hold the context
BUDGET_REFUSAL = re.compile(r"kvggml: error: (OLLAMA_KV_COMPRESSION_BUDGET is .* below what this context can need.*)")


def check(res: subprocess.CompletedProcess, variant: Variant, cmd: list[str]) -> None:
    if res.returncode == 0:
        return
    refusal = BUDGET_REFUSAL.search(res.stderr)
    if refusal:
        raise Refused(refusal.group(1))
    raise MeasurementError(f"{variant.label}: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def run_watched(
    cmd: list[str], env: dict, watch: Watch, progress: Progress, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), and while it runs, progress(what watch finds
    in the output so far) whenever that changes: a cell can take most of an hour."""
    shown = None

    def on_output(stdout: str, stderr: str) -> None:
        nonlocal shown
        now = watch(stdout, stderr)
        if now and now != shown:
            progress(now)
            shown = now

    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            stdout, stderr = read_both(proc, on_output)
        except BaseException:  # Ctrl-C, as subprocess.run does: the program does not outlive the bench
            proc.kill()
            raise
        return subprocess.CompletedProcess(cmd, proc.wait(), stdout, stderr)


def read_both(proc: subprocess.Popen, on_output: Callable[[str, str], None]) -> tuple[str, str]:
    """proc's stdout and stderr to their end, read as they come (neither pipe may fill while the other is
    waited on), on_output(both so far) after each read."""
    output = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    text = ("", "")
    with selectors.DefaultSelector() as streams:
        for stream in output:
            streams.register(stream, selectors.EVENT_READ)
        while streams.get_map():
            for key, _ in streams.select():
                data = os.read(key.fd, 1 << 16)
                if not data:
                    streams.unregister(key.fileobj)
                    continue
                output[key.fileobj] += data
                text = tuple(bytes(b).decode(errors="replace") for b in output.values())
                on_output(*text)
    return text


def probe_progress(stdout: str, stderr: str) -> str | None:
    """The probe's last progress line (kvggml.bench.probe.report)."""
    lines = re.findall(f"^{re.escape(PROGRESS)}(.*)$", stderr, re.MULTILINE)
    return lines[-1] if lines else None


def run_probe(variant: Variant, *args: object, progress: Progress = lambda what: None) -> object:
    """kvggml.bench.probe with the variant's library and settings; the JSON of its last line."""
    cmd = [sys.executable, "-m", "kvggml.bench.probe", *map(str, args)]
    res = run_watched(cmd, variant.env(), probe_progress, progress, cwd=REPO)
    check(res, variant, cmd[2:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_tool(
    variant: Variant,
    name: str,
    *args: object,
    flash_attn: bool = True,
    watch: Watch = lambda stdout, stderr: None,
    progress: Progress = lambda what: None,
) -> subprocess.CompletedProcess:
    """A llama.cpp program of the variant's build, its output captured."""
    cmd = [str(variant.tool(name)), *map(str, args), *variant.cache_flags(flash_attn)]
    res = run_watched(cmd, variant.env(), watch, progress)
    check(res, variant, cmd)
    return res


def measure_memory(variant: Variant, params: dict, inputs: Inputs, out: Path, progress: Progress) -> dict:
    probe = run_probe(
        variant,
        "memory",
        inputs.model,
        inputs.text,
        params["n_ctx"],
        variant.ggml_type,
        int(params["fill"]),
        inputs.threads,
        progress=progress,
    )
    stats = probe["stats"]
    return {
        # kvggml: its exact cells + compressed blocks; stock: the cells it allocated for n_ctx
        "kv_mib": (stats["exact_bytes"] + stats["compressed_bytes"]) / MIB if stats else probe["allocated_mib"],
        "exact_f16_mib": stats["exact_bytes"] / MIB if stats else None,
        "allocated_mib": probe["allocated_mib"],
        "peak_rss_mib": probe["peak_rss_mib"] if params["fill"] else None,
        "prompt_tokens": probe["tokens"],
        "prefill_s": probe["prefill_s"],
        "stats": stats,
    }


# How speed cells are measured, part of their key: cells measured one after another carried the
# machine's drift into their ratios (stock f16's decode at depth 8192 moved from 29.1 to 20.4 tokens/s
# between two runs on the same 2 cores, more than the presets differ).
SPEED_ORDER = "the variants of a depth in turn, one repetition each"


def measure_speed_in_turn(
    variants: list[Variant], params: dict, inputs: Inputs, out: Path, progress: Progress, done: Done
) -> None:
    """The speed cells of one depth and flash-attention setting: each of params["reps"] rounds runs one
    llama-bench repetition of every variant, so drift spreads over the variants instead of landing on
    one. Every variant is done after the last round. (llama-bench writes no file under out.)"""
    runs: dict[str, list[dict]] = {v.label: [] for v in variants}
    refused: dict[str, dict] = {}
    for rep in range(params["reps"]):
        for variant in (v for v in variants if v.label not in refused):
            progress(f"repetition {rep + 1} of {params['reps']}: {variant.label}")
            try:
                res = run_tool(
                    variant,
                    "llama-bench",
                    *("-m", inputs.model, "-p", params["n_prompt"], "-n", params["n_gen"], "-d", params["depth"]),
                    *("-b", params["n_batch"], "-r", 1, "-t", inputs.threads, "-o", "json"),
                    flash_attn=bool(params["flash_attn"]),
                )
            except Refused as refusal:
                refused[variant.label] = {"refused": str(refusal)}
                continue
            runs[variant.label].append(speed_result(json.loads(res.stdout)))
    for label, samples in runs.items():
        done(label, refused.get(label) or joined_speed_results(samples))


def joined_speed_results(runs: list[dict]) -> dict:
    """One result from single repetitions: mean and sample deviation (llama-bench's) of each rate."""
    joined = {}
    for kind in runs[0]:
        samples = [s for run in runs for s in run[kind]["samples"]]
        joined[kind] = {
            "mean": statistics.fmean(samples),
            "sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples,
        }
    return joined


def speed_result(tests: list[dict]) -> dict:
    """llama-bench's JSON tests of one configuration: its prefill (n_prompt) and decode (n_gen) rates."""
    result = {}
    for test in tests:
        kind = "prefill" if test["n_prompt"] else "decode"
        result[kind] = {"mean": test["avg_ts"], "sd": test["stddev_ts"], "samples": test["samples_ts"]}
    return result


def speed_records(tests: list[dict]) -> list[dict]:
    """Speed cells from llama-bench's JSON lines run on another machine (scripts/speed_on_another_cpu.sh),
    each line with the "label" of its variant: a cell per variant, flash attention, depth and thread count."""
    groups: dict[tuple, list[dict]] = {}
    for test in tests:
        key = (test["label"], int(test["flash_attn"]), test["n_depth"], test["n_threads"])
        groups.setdefault(key, []).append(test)
    records = []
    for (label, flash_attn, depth, threads), group in groups.items():
        first = group[0]
        params = {
            "depth": depth,
            "flash_attn": flash_attn,
            "reps": len(first["samples_ts"]),
            "n_prompt": max(t["n_prompt"] for t in group),
            "n_gen": max(t["n_gen"] for t in group),
            "n_batch": first["n_batch"],
            "threads": threads,
        }
        inputs = {"model": {"path": first["model_filename"], "bytes": first["model_size"]}, "cpu": first["cpu_info"]}
        record = {"measurement": "speed", "variant": label, "params": params, "inputs": inputs}
        records.append({**record, "result": speed_result(group)})
    return records


def kld_base(params: dict, out: Path) -> Path:
    """Stock f16's logits for these quality parameters: llama-perplexity --kl-divergence-base, or the
    probe's logits of the last positions."""
    last = f"-last{params['last']}" if "last" in params else ""
    return out / f"kld-base-c{params['n_ctx']}-chunks{params['chunks']}{last}.bin"


def perplexity_progress(n_chunks: int) -> Watch:
    """How many chunks llama-perplexity has scored: a chunk's "[i]PPL," (the base logits' run), or its row
    of the KLD table ("   i    PPL ± ...")."""

    def chunks_done(stdout: str, stderr: str) -> str | None:
        done = re.findall(r"\[(\d+)\][\d.]+,|^\s*(\d+)\s+[\d.]+ ±", stdout + stderr, re.MULTILINE)
        return f"llama-perplexity: {max(int(a or b) for a, b in done)} of {n_chunks} chunks done" if done else None

    return chunks_done


def perplexity(variant: Variant, params: dict, inputs: Inputs, progress: Progress, *extra: object) -> str:
    res = run_tool(
        variant,
        "llama-perplexity",
        *("-m", inputs.model, "-f", inputs.text, "-c", params["n_ctx"], "-b", 512, "-ub", 512),
        *("--chunks", params["chunks"], "-t", inputs.threads, *extra),
        watch=perplexity_progress(params["chunks"]),
        progress=progress,
    )
    return res.stdout + res.stderr


def number(pattern: str, output: str) -> float:
    match = re.search(pattern, output)
    if not match:
        raise MeasurementError(f"llama-perplexity printed no {pattern!r}:\n{output[-3000:]}")
    return float(match.group(1))


def measure_quality(variant: Variant, params: dict, inputs: Inputs, out: Path, progress: Progress) -> dict:
    """The reference writes the base logits (and is its own KLD 0); every other variant is scored against
    them, written again first if they are missing."""
    base = kld_base(params, out)
    if "last" in params:
        return measure_quality_at_the_end(variant, params, inputs, base, progress)
    reference = Variant.parse(REFERENCE)
    if variant.label == REFERENCE or not base.is_file():
        output = perplexity(reference, params, inputs, progress, "--kl-divergence-base", base)
        if variant.label == REFERENCE:
            ppl = number(r"Final estimate: PPL = ([\d.]+)", output)
            return {"ppl": ppl, "kld_mean": 0.0, "kld_p99": 0.0, "same_top_pct": 100.0}
    output = perplexity(variant, params, inputs, progress, "--kl-divergence-base", base, "--kl-divergence")
    return {
        "ppl": number(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", output),
        "kld_mean": number(r"Mean\s+KLD:\s*([-\d.]+)", output),
        "kld_p99": number(r"99\.0%\s+KLD:\s*([-\d.]+)", output),
        "same_top_pct": number(r"Same top p:\s*([\d.]+)", output),
    }


def measure_quality_at_the_end(variant: Variant, params: dict, inputs: Inputs, base: Path, progress: Progress) -> dict:
    """The probe's quality over the last positions of each context; the reference writes the base."""

    def tail(v: Variant) -> dict:
        sizes = (params["n_ctx"], v.ggml_type, params["chunks"], params["last"], inputs.threads)
        return run_probe(v, "tail", inputs.model, inputs.text, *sizes, base, progress=progress)

    if variant.label == REFERENCE or not base.is_file():
        base.unlink(missing_ok=True)
        result = tail(Variant.parse(REFERENCE))
        if variant.label == REFERENCE:
            return result
    return tail(variant)


def measure_recall(variant: Variant, params: dict, inputs: Inputs, out: Path, progress: Progress) -> dict:
    depths = ",".join(map(str, params["depths"]))
    sizes = (params["n_ctx"], variant.ggml_type, depths, params["seeds"], inputs.threads)
    cases = run_probe(variant, "recall", inputs.model, *sizes, progress=progress)
    return {
        "recalled": sum(c["recalled"] for c in cases),
        "cases": len(cases),
        "prompt_tokens": max(c["prompt_tokens"] for c in cases),
        "details": cases,
    }


def one_at_a_time(measure_one: Callable[[Variant, dict, Inputs, Path, Progress], dict]) -> Measure:
    """A measurement whose variants run alone, one after another, each done as soon as it finishes."""

    def measure_each(
        variants: list[Variant], params: dict, inputs: Inputs, out: Path, progress: Progress, done: Done
    ) -> None:
        for variant in variants:
            progress(variant.label)
            try:
                result = measure_one(
                    variant, params, inputs, out, lambda what, v=variant: progress(f"{v.label}: {what}")
                )
            except Refused as refusal:
                result = {"refused": str(refusal)}
            done(variant.label, result)

    return measure_each


# Each measurement takes the variants of one set of parameters (the cells of one group), with what it
# reads and where it may write, and calls done(label, result) for every variant, where a result may
# be {"refused": the library's reason}.
MEASURE: dict[str, Measure] = {
    "memory": one_at_a_time(measure_memory),
    "speed": measure_speed_in_turn,
    "quality": one_at_a_time(measure_quality),
    "recall": one_at_a_time(measure_recall),
}
