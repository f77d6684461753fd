"""`kvggml bench`: bad inputs named before anything runs, cells on the real model, resuming cell by cell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env, run_cli

from kvggml.bench.report import budget_series, frontier_rows, refused_table
from kvggml.bench.run import QUICK, Settings, plan
from kvggml.bench.store import Cell, ResultStore
from kvggml.bench.variants import Variant
from kvggml.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def fake_gguf(tmp_path: Path) -> Path:
    """A file that passes the magic check: enough to reach the checks after it, with no model at all."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def bench(*args: str, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("bench", *args, "--out", str(out), env=env, timeout=300)


@pytest.mark.fast
def test_bad_model_and_text_are_named_before_any_measurement(tmp_path):
    out = tmp_path / "out"
    env = child_env(KVGGML_BUILD_DIR=str(tmp_path / "no-build"))  # a check that ran anything would fail otherwise
    missing = tmp_path / "missing.gguf"
    res = bench("--model", str(missing), out=out, env=env)
    assert res.returncode == 2 and f"kvggml bench: error: --model {missing}: no such file" in res.stderr
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    res = bench("--model", str(notes), out=out, env=env)
    assert res.returncode == 2
    assert f"--model {notes}: not a GGUF file (it starts with b'not '; a GGUF starts with b'GGUF')" in res.stderr
    res = bench("--model", str(fake_gguf(tmp_path)), "--text", str(tmp_path / "missing.txt"), out=out, env=env)
    assert res.returncode == 2 and f"--text {tmp_path / 'missing.txt'}: no such file" in res.stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    res = bench("--model", str(fake_gguf(tmp_path)), "--text", str(latin1), out=out, env=env)
    assert res.returncode == 2 and f"--text {latin1}: not UTF-8 text" in res.stderr
    res = bench("--model", str(fake_gguf(tmp_path)), "--variant", "kvggml balanced;BUDGET=lots", out=out, env=env)
    assert res.returncode == 2 and "OLLAMA_KV_COMPRESSION_BUDGET='lots'" in res.stderr
    res = bench("--only", "memory,speeed", out=out, env=env)
    assert res.returncode == 2 and "--only: speeed: expected some of memory,speed,quality,recall" in res.stderr
    assert not out.exists()  # nothing measured, nothing written


@pytest.mark.fast
def test_quality_last_must_leave_a_prefix_to_read(tmp_path):
    env = child_env(KVGGML_BUILD_DIR=str(tmp_path / "no-build"))  # refused before anything runs
    res = bench("--quick", "--only", "quality", "--quality-last", "1024", out=tmp_path / "out", env=env)
    assert res.returncode == 2 and "--quality-last 1024: must be below --quality-ctx 1024" in res.stderr


@pytest.mark.fast
def test_variants_name_what_is_wrong():
    assert Variant.parse("kvggml lo;THRESHOLD=256;BUDGET=0.2").compression_env() == {
        "OLLAMA_KV_COMPRESSION": "1",
        "OLLAMA_KV_COMPRESSION_PRESET": "lo",
        "OLLAMA_KV_COMPRESSION_THRESHOLD": "256",
        "OLLAMA_KV_COMPRESSION_BUDGET": "0.2",
    }
    with pytest.raises(ValueError, match="unknown 'kvggml best': expected one of stock f16"):
        Variant.parse("kvggml best")
    with pytest.raises(ValueError, match="'WINDOW=3' is not NAME=VALUE with NAME one of"):
        Variant.parse("kvggml hi;WINDOW=3")
    with pytest.raises(ValueError, match="settings apply to kvggml variants only"):
        Variant.parse("stock q8_0;BUDGET=0.5")
    with pytest.raises(ConfigError, match="OLLAMA_KV_COMPRESSION_SCHEDULE"):
        Variant.parse("kvggml balanced;SCHEDULE=2048:9.9")


@pytest.mark.fast
def test_a_variant_loads_its_own_builds_libraries(tmp_path, monkeypatch):
    """A copied build's programs name the folder they were built in: the loader's path must win."""
    monkeypatch.setenv("KVGGML_BUILD_DIR", str(tmp_path / "copy"))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/elsewhere")
    for label, build in (("stock q8_0", "stock"), ("kvggml hi", "patched")):
        env = Variant.parse(label).env()
        assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'copy' / build / 'bin'}:/elsewhere"
        assert env["KVGGML_LIB"] == build


def quick_plan(measurements: list[str], **sizes) -> list[Cell]:
    """--quick's cells of stock f16 and kvggml balanced (stock f16 read empty), with sizes changed."""
    settings = Settings(
        **{**QUICK, **sizes},
        model=REPO / "m.gguf",
        text=None,
        out=REPO,
        command="kvggml bench --quick",
        variants=["stock f16", "kvggml balanced"],
        measurements=measurements,
        no_fill=frozenset({"stock f16"}),
    )
    return plan(settings)


@pytest.mark.fast
def test_the_plan_has_one_cell_per_measurement_variant_and_parameter():
    cells = quick_plan(["memory", "speed", "quality", "recall"])
    assert [(c.measurement, c.variant) for c in cells] == [
        *[("memory", v) for _ in QUICK["memory_ctx"] for v in ("stock f16", "kvggml balanced")],
        *[(m, v) for m in ("speed", "quality", "recall") for v in ("stock f16", "kvggml balanced")],
    ]
    assert cells[0].params == {"n_ctx": 1024, "fill": False} and cells[1].params == {"n_ctx": 1024, "fill": True}


@pytest.mark.fast
def test_the_store_reuses_only_cells_whose_whole_key_matches(tmp_path):
    path = tmp_path / "bench.json"
    cell = Cell("memory", "stock f16", {"n_ctx": 1024, "fill": True})
    inputs = {"model": {"path": "m.gguf", "bytes": 1}, "text_sha256": "a", "libraries": {"stock": "sha256:1"}}
    ResultStore(path, "first").put(cell.key(inputs), {"kv_mib": 22.5})
    store = ResultStore(path, "second")
    assert store.find(cell.key(inputs))["result"] == {"kv_mib": 22.5}
    assert store.find(cell.key({**inputs, "text_sha256": "b"})) is None
    assert store.find(Cell("memory", "stock f16", {"n_ctx": 2048, "fill": True}).key(inputs)) is None
    assert ResultStore(path, "third", fresh=True).find(cell.key(inputs)) is None
    # measured anew with other inputs: the record replaces the stale one
    store.put(cell.key({**inputs, "text_sha256": "b"}), {"kv_mib": 22.6})
    assert [r["result"] for r in json.loads(path.read_text())["cells"]] == [{"kv_mib": 22.6}]
    assert not list(tmp_path.glob(".*.tmp"))


def frontier_record(measurement: str, variant: str, result: dict) -> dict:
    return {"measurement": measurement, "variant": variant, "params": {"n_ctx": 8192}, "result": result}


FRONTIER = [
    frontier_record("memory", "stock f16", {"kv_mib": 180.0, "exact_f16_mib": None}),
    frontier_record("memory", "stock q4_0", {"kv_mib": 50.6, "exact_f16_mib": None}),
    frontier_record("memory", "kvggml balanced", {"kv_mib": 60.6, "exact_f16_mib": 23.2}),
    frontier_record("memory", "kvggml lo", {"kv_mib": 55.0, "exact_f16_mib": 23.2}),
    frontier_record("quality", "stock f16", {"kld_mean": 0.0, "same_top_pct": 100.0}),
    frontier_record("quality", "stock q4_0", {"kld_mean": 0.0558, "same_top_pct": 89.5}),
    frontier_record("quality", "kvggml balanced", {"kld_mean": 0.0232, "same_top_pct": 93.4}),
    frontier_record("quality", "kvggml lo", {"kld_mean": 0.0600, "same_top_pct": 90.0}),
]


@pytest.mark.fast
def test_the_frontier_marks_dominated_variants():
    rows = {r["variant"]: r for r in frontier_rows(FRONTIER, 8192)}
    assert rows["kvggml balanced"]["vs_f16"] == pytest.approx(60.6 / 180)
    assert {v: r["pareto"] for v, r in rows.items()} == {
        "stock f16": True,
        "stock q4_0": True,
        "kvggml balanced": True,
        "kvggml lo": False,  # more memory than q4_0 at a higher KLD
    }


@pytest.mark.fast
def test_refused_speed_cells_are_told_apart_by_flash_attention():
    reason = "OLLAMA_KV_COMPRESSION_BUDGET is 14745600 bytes, below what this context can need"
    records = [
        {
            "variant": "kvggml balanced;BUDGET=0.25",
            "measurement": "speed",
            "result": {"refused": reason},
            "params": {"depth": 2048, "flash_attn": flash, "reps": 3},
        }
        for flash in (1, 0)
    ]
    rows = refused_table(records).splitlines()[2:]
    parameters = [row.split(" | ")[2] for row in rows]
    assert parameters == ["depth 2048, flash attention on", "depth 2048, flash attention off"]


@pytest.mark.fast
def test_speed_cells_of_a_depth_take_turns_one_repetition_each(monkeypatch):
    from kvggml.bench import measure
    from kvggml.bench.run import groups

    calls = []

    def fake_run_tool(variant, name, *args, flash_attn):
        calls.append(variant.label)
        if "BUDGET" in variant.label:
            raise measure.Refused("OLLAMA_KV_COMPRESSION_BUDGET is 1 bytes, below what this context can need")
        rate = 10.0 * len(calls)  # the machine drifts: every run is faster than the one before
        tests = [
            {"n_prompt": n_prompt, "avg_ts": r, "stddev_ts": 0.0, "samples_ts": [r]}
            for n_prompt, r in ((512, rate), (0, rate + 1))
        ]
        return subprocess.CompletedProcess([], 0, stdout=json.dumps(tests), stderr="")

    monkeypatch.setattr(measure, "run_tool", fake_run_tool)
    labels = ["stock f16", "kvggml balanced", "kvggml balanced;BUDGET=0.25"]
    params = {"depth": 512, "flash_attn": 1, "reps": 3, "n_prompt": 512, "n_gen": 64, "n_batch": 512}
    results = {}
    measure.MEASURE["speed"](
        [Variant.parse(v) for v in labels],
        params,
        measure.Inputs(Path("m"), Path("t"), 2),
        Path("out"),
        lambda what: None,
        results.__setitem__,
    )
    # round by round, a refused variant left out after its refusal
    assert calls == ["stock f16", "kvggml balanced", "kvggml balanced;BUDGET=0.25"] + labels[:2] * 2
    assert results["stock f16"]["prefill"]["samples"] == [10.0, 40.0, 60.0]
    assert results["kvggml balanced"]["decode"]["samples"] == [21.0, 51.0, 71.0]
    assert results["kvggml balanced"]["decode"]["mean"] == pytest.approx(143 / 3)
    assert results["kvggml balanced;BUDGET=0.25"]["refused"].startswith("OLLAMA_KV_COMPRESSION_BUDGET is 1 bytes")
    # the cells measured together: those of one measurement and one set of parameters
    grouped = groups([(c, {}) for c in quick_plan(["speed", "quality"], depths=[512, 2048])])
    both = ["stock f16", "kvggml balanced"]
    assert [[c.variant for c, _ in g] for g in grouped] == [both, both, both]
    assert [(g[0][0].measurement, g[0][0].params.get("depth")) for g in grouped] == [
        ("speed", 512),
        ("speed", 2048),
        ("quality", None),
    ]


@pytest.mark.fast
def test_cells_measured_alone_are_each_done_before_the_next_starts():
    # so an interrupted run keeps every finished recall or quality cell of its group
    from kvggml.bench import measure

    events = []

    def fake_measure(variant, params, inputs, out, progress):
        events.append(("measure", variant.label))
        progress("halfway")
        if "BUDGET" in variant.label:
            raise measure.Refused("OLLAMA_KV_COMPRESSION_BUDGET is 1 bytes, below what this context can need")
        return {"measured": variant.label}

    labels = ["stock f16", "kvggml balanced;BUDGET=0.25", "kvggml balanced"]
    measure.one_at_a_time(fake_measure)(
        [Variant.parse(v) for v in labels],
        {"n_ctx": 2048},
        measure.Inputs(Path("m"), Path("t"), 2),
        Path("out"),
        lambda what: events.append(("progress", what)),
        lambda label, result: events.append(("done", label, result)),
    )
    refusal = {"refused": "OLLAMA_KV_COMPRESSION_BUDGET is 1 bytes, below what this context can need"}
    assert events == [
        ("progress", "stock f16"),
        ("measure", "stock f16"),
        ("progress", "stock f16: halfway"),
        ("done", "stock f16", {"measured": "stock f16"}),
        ("progress", "kvggml balanced;BUDGET=0.25"),
        ("measure", "kvggml balanced;BUDGET=0.25"),
        ("progress", "kvggml balanced;BUDGET=0.25: halfway"),
        ("done", "kvggml balanced;BUDGET=0.25", refusal),
        ("progress", "kvggml balanced"),
        ("measure", "kvggml balanced"),
        ("progress", "kvggml balanced: halfway"),
        ("done", "kvggml balanced", {"measured": "kvggml balanced"}),
    ]


@pytest.mark.fast
def test_a_running_probe_shows_its_progress_and_its_whole_output_is_kept():
    from kvggml.bench import measure
    from kvggml.bench.probe import PROGRESS

    # progress lines on stderr between large writes to stdout: neither pipe may stall the other
    script = (
        "import sys\n"
        "for i in range(3):\n"
        "    sys.stdout.write('x' * 100000 + '\\n'); sys.stdout.flush()\n"
        f"    print({PROGRESS!r} + f'case {{i + 1}} of 3', file=sys.stderr, flush=True)\n"
        f"    print({PROGRESS!r} + f'case {{i + 1}} of 3', file=sys.stderr, flush=True)\n"
        "print('llama.cpp says: done', file=sys.stderr)\n"
        "print('{\"recalled\": 3}')\n"
        "sys.exit(7)\n"
    )
    shown = []
    res = measure.run_watched([sys.executable, "-c", script], dict(os.environ), measure.probe_progress, shown.append)
    # the newest line each time the output grows (lines written together show only the last), each once
    assert shown[-1] == "case 3 of 3" and shown == sorted(set(shown))
    assert set(shown) <= {"case 1 of 3", "case 2 of 3", "case 3 of 3"}
    assert res.returncode == 7
    assert res.stdout.count("x" * 100000) == 3 and res.stdout.splitlines()[-1] == '{"recalled": 3}'
    assert res.stderr.endswith("llama.cpp says: done\n")


@pytest.mark.fast
def test_llama_perplexitys_chunks_are_counted_in_both_of_its_outputs():
    from kvggml.bench.measure import perplexity_progress

    watch = perplexity_progress(3)
    assert watch("", "perplexity: calculating perplexity over 3 chunks, n_ctx=8192") is None
    # writing the base logits: "[i]PPL," as each chunk ends
    assert watch("[1]12.8031,[2]13.0112,", "") == "llama-perplexity: 2 of 3 chunks done"
    # scoring against them: a row of the KLD table per chunk, then the summary (no chunk in it)
    table = (
        "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence\n"
        "   1      12.8234 ±    0.3456       0.00123 ±    0.00045       0.01830 ±    0.00100\n"
        "   2      13.0131 ±    0.2990       0.00101 ±    0.00031       0.01790 ±    0.00080\n"
        "====== KL divergence statistics ======\n"
        "Mean    KLD:   0.018100 ±   0.000600\n"
        "99.0%   KLD:   0.160000\n"
    )
    assert watch(table, "") == "llama-perplexity: 2 of 3 chunks done"


@pytest.mark.fast
def test_kld_against_budget_has_a_line_per_setting_ordered_by_budget():
    records = [
        frontier_record("quality", "kvggml balanced;THRESHOLD=256;BUDGET=0.25", {"kld_mean": 0.026}),
        frontier_record("quality", "kvggml balanced;THRESHOLD=256;BUDGET=0.21", {"kld_mean": 0.036}),
        frontier_record("quality", "kvggml balanced;BUDGET=0.21;GUIDANCE=1", {"kld_mean": 0.040}),
        frontier_record("quality", "kvggml balanced;BUDGET=64MiB", {"kld_mean": 0.050}),  # bytes: no x
        frontier_record("quality", "kvggml balanced", {"kld_mean": 0.023}),
        frontier_record("quality", "stock q4_0", {"kld_mean": 0.0558}),
    ]
    assert budget_series(records) == {
        "kvggml balanced;THRESHOLD=256": [(0.21, 0.036), (0.25, 0.026)],
        "kvggml balanced;GUIDANCE=1": [(0.21, 0.040)],
    }


@pytest.mark.fast
def test_measure_tier_frontier_reads_the_bench_cells(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"cells": FRONTIER}))
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "measure_tier.py"), "frontier", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "| kvggml balanced | 60.6 | 33.7 % | 23.2 | 0.0232 | 93.4 | yes |" in res.stdout
    assert "| kvggml lo | 55.0 | 30.6 % | 23.2 | 0.06 | 90.0 |  |" in res.stdout
    assert (tmp_path / "tier-frontier.png").stat().st_size > 0


def llama_bench_line(label: str, fa: int, depth: int, threads: int, n_prompt: int, rate: float, rc: int = 0) -> str:
    """One test of llama-bench's JSON lines, labelled as scripts/speed_on_another_cpu.sh labels them."""
    test = dict(label=label, rc=rc, flash_attn=fa, n_depth=depth, n_threads=threads, n_prompt=n_prompt)
    test |= dict(n_gen=0 if n_prompt else 32, n_batch=2048, avg_ts=rate, stddev_ts=1.0, samples_ts=[rate - 1, rate + 1])
    return json.dumps(test | dict(model_filename="m.gguf", model_size=1000, cpu_info="Some CPU"))


def measure_tier_import(lines: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    script = [sys.executable, str(REPO / "scripts" / "measure_tier.py"), "speed", "--out", str(tmp_path / "out")]
    return subprocess.run([*script, "--import", str(tmp_path / "lines.jsonl")], capture_output=True, text=True)


@pytest.mark.fast
def test_speed_measured_elsewhere_is_compared_at_each_thread_count(tmp_path):
    lines = [
        llama_bench_line("stock f16", 1, 8192, 16, 512, 300.0),
        llama_bench_line("stock f16", 1, 8192, 16, 0, 36.0),
        llama_bench_line("stock f16", 0, 8192, 16, 0, 65.0),
        llama_bench_line("kvggml balanced", 1, 8192, 16, 0, 91.0),
        llama_bench_line("stock f16", 0, 8192, 2, 0, 18.0),
        llama_bench_line("kvggml balanced", 1, 8192, 2, 0, 24.0),
    ]
    res = measure_tier_import(lines, tmp_path)
    assert res.returncode == 0, res.stderr
    # each cell against the fastest stock decode at its own thread count; a decode-only cell has no prefill
    fastest = "stock f16, flash attention off |"
    assert f"| stock f16 | on | 16 | 8192 | 300.0 ± 1.0 | 36.0 ± 1.0 | 0.55× | {fastest}" in res.stdout
    assert f"| kvggml balanced | on | 16 | 8192 | – | 91.0 ± 1.0 | 1.40× | {fastest}" in res.stdout
    assert f"| kvggml balanced | on | 2 | 8192 | – | 24.0 ± 1.0 | 1.33× | {fastest}" in res.stdout
    assert (tmp_path / "out" / "bench-threads.png").stat().st_size > 0
    cells = json.loads((tmp_path / "out" / "bench.json").read_text())["cells"]
    assert len(cells) == 5 and {c["params"]["threads"] for c in cells} == {2, 16}

    failed = measure_tier_import([llama_bench_line("kvggml balanced", 1, 8192, 2, 0, 24.0, rc=139)], tmp_path)
    assert failed.returncode != 0 and "llama-bench failed for kvggml balanced" in failed.stderr
    unlabelled = measure_tier_import([json.dumps({"n_depth": 0})], tmp_path)
    assert unlabelled.returncode != 0 and "not llama-bench JSON lines with a label" in unlabelled.stderr


def test_a_text_too_short_for_the_context_is_named(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    res = bench("--quick", "--only", "quality", "--text", str(short), out=tmp_path / "out")
    assert res.returncode == 2
    assert f"--text {short}: 6 tokens, too short: quality at n_ctx 1024 with 2 chunks needs 2048" in res.stderr


def cells(out: Path) -> list[dict]:
    return json.loads((out / "bench.json").read_text())["cells"]


def test_memory_cells_are_kept_when_interrupted_and_reused_on_a_rerun(tmp_path):
    out = tmp_path / "out"
    args = ["--quick", "--only", "memory", "--memory-ctx", "2048", "--variants", "kvggml balanced"]
    # Interrupted (Ctrl-C) once the first cell is in the file: it stays there. SIGINT as a terminal
    # gives it: a harness started in the background passes it on ignored, and Python then keeps it so.
    run = subprocess.Popen(
        [sys.executable, "-m", "kvggml.cli", "bench", *args, "--out", str(out)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not (out / "bench.json").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr[-3000:]
    assert "interrupted: 1 of 2 cells kept" in stderr
    assert [c["variant"] for c in cells(out)] == ["stock f16"]

    res = bench(*args, out=out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 cells, 1 reused" in res.stderr
    assert "kvggml balanced: 2048 of 2048 tokens read" in res.stderr  # the probe's progress, while it ran
    first = cells(out)
    by_variant = {c["variant"]: c["result"] for c in first}
    assert by_variant["stock f16"]["kv_mib"] == pytest.approx(45.0)  # 2048 cells of SmolLM2's 22.5 KiB
    balanced = by_variant["kvggml balanced"]
    assert 0 < balanced["exact_f16_mib"] < balanced["kv_mib"] < by_variant["stock f16"]["kv_mib"]
    assert balanced["stats"]["compressed_tokens"] > 0 and balanced["prompt_tokens"] == 2048
    table = (out / "bench.md").read_text()
    assert f"kvggml bench {' '.join(args[:-1])} 'kvggml balanced' --out {out}" in table
    assert "| kvggml balanced | 2048 |" in table and "| stock f16 | 2048 | 45.0 | 100.0 % |" in table

    res = bench(*args, out=out)
    assert "2 cells, 2 reused" in res.stderr and "0 to measure" in res.stderr
    assert cells(out) == first

    # A changed parameter measures only the cells it adds
    res = bench(*args[:4], "512,2048", *args[5:], out=out)
    assert "4 cells, 2 reused" in res.stderr and "2 to measure" in res.stderr
    assert [c for c in cells(out) if c["params"]["n_ctx"] == 2048] == first
    assert {c["variant"] for c in cells(out) if c["params"]["n_ctx"] == 512} == {"stock f16", "kvggml balanced"}


def test_a_budget_the_context_cannot_hold_is_a_refused_cell_with_the_librarys_reason(tmp_path):
    """A fraction of f16 that holds a long context can be too small for a short one, whose exact
    window is a larger part of it: that cell is recorded as refused, and the bench goes on."""
    out = tmp_path / "out"
    variant = "kvggml balanced;BUDGET=0.25"
    args = ["--quick", "--only", "memory", "--memory-ctx", "1024", "--variants", variant, "--variant", "kvggml lo"]
    res = bench(*args, out=out)
    assert res.returncode == 0, res.stderr[-3000:]
    by_variant = {c["variant"]: c["result"] for c in cells(out)}
    assert by_variant["kvggml lo"]["kv_mib"] > 0  # the cell after the refused one was measured
    reason = by_variant[variant]["refused"]
    assert reason.startswith("OLLAMA_KV_COMPRESSION_BUDGET is 5898240 bytes, below what this context can need")
    assert f"memory | {variant} | n_ctx 1024, fill: refused: {reason}" in res.stderr
    table = (out / "bench.md").read_text()
    assert f"| {variant} | memory | n_ctx 1024 | {reason} |" in table
    assert f"| {variant} | 1024 |" not in table  # not a row of the memory table
    assert "3 cells, 3 reused" in bench(*args, out=out).stderr  # a refusal is a finished cell


def test_quality_at_the_end_of_each_context_scores_the_same_positions_for_every_variant(tmp_path):
    """--quality-last: the probe's logits of each context's last positions instead of llama-perplexity's
    second half (too large for a large vocabulary at a long context)."""
    out = tmp_path / "out"
    args = ["--quick", "--only", "quality", "--quality-last", "32", "--variants", "stock q4_0", "kvggml hi"]
    res = bench(*args, out=out)
    assert res.returncode == 0, res.stderr[-3000:]
    by_variant = {c["variant"]: c for c in cells(out)}
    assert {c["params"]["last"] for c in by_variant.values()} == {32}
    f16, q4_0, hi = (by_variant[v]["result"] for v in ("stock f16", "stock q4_0", "kvggml hi"))
    assert f16["kld_mean"] == 0 and f16["same_top_pct"] == 100
    assert 0 < hi["kld_mean"] < q4_0["kld_mean"]  # as llama-perplexity ranks them (README, quality)
    assert hi["stats"]["compressed_tokens"] > 0 and f16["stats"] is None
    assert 1 < f16["ppl"] < q4_0["ppl"] * 1.5
    assert list(out.glob("kld-base-c1024-chunks2-last32.bin"))


@pytest.mark.fast
def test_readme_bench_sections_are_the_bench_outputs():
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_results.py"), "--check"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
