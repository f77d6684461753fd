"""The compressed tier inside the patched llama.cpp, on the default model.

Each run is its own process (tests/scripts/probe.py): stock and patched libllama cannot share one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PATCHED, child_env, last_json, run_script

from kvggml import native
from kvggml.library import library_dir
from kvggml.metrics import mean_kld
from kvggml.model import default_model_path

# Small but real: 1536 tokens with a 256-token window crosses the threshold many times.
N_CTX, TOKENS, LAST, WINDOW = 4096, 1536, 64, 256


def probe(tmp_path: Path, lib: str, compression: dict | None = None, **args) -> dict:
    params = {
        "n_ctx": N_CTX,
        "tokens": TOKENS,
        "logits_last": LAST,
        "out": str(tmp_path / f"{lib}-{len(os.listdir(tmp_path))}.npy"),
        **args,
    }
    res = run_script("probe", json.dumps(params), env=child_env(lib, **(compression or {})), timeout=900)
    report = last_json(res)
    report["stderr"] = res.stderr
    if "error" not in report and params["logits_last"]:
        report["logits"] = np.load(params["out"])
    return report


ON = {"OLLAMA_KV_COMPRESSION": "1", "OLLAMA_KV_COMPRESSION_THRESHOLD": str(WINDOW)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tier")
    return {
        "stock": probe(tmp, "stock"),
        "patched-off": probe(tmp, "patched", {"OLLAMA_KV_COMPRESSION": "0"}),
        "hi": probe(tmp, "patched", {**ON, "OLLAMA_KV_COMPRESSION_PRESET": "hi"}),
        "balanced": probe(tmp, "patched", ON),
        "stock-no-fa": probe(tmp, "stock", flash_attn=False),
        "balanced-no-fa": probe(tmp, "patched", ON, flash_attn=False),
    }


def test_compression_off_is_bit_identical_to_stock(runs):
    assert np.array_equal(runs["patched-off"]["logits"], runs["stock"]["logits"])
    assert runs["patched-off"]["stats"]["enabled"] == 0


def test_long_prompt_is_compressed_while_it_is_read(runs):
    stats = runs["balanced"]["stats"]
    # positions 4 .. TOKENS-WINDOW-1 are old; whole 16-token blocks of them are compressed
    assert stats["compressed_tokens"] == (TOKENS - 4 - WINDOW) // 16 * 16
    assert stats["blocks"] * 16 == stats["compressed_tokens"]
    # the cache was sized for sinks + window + block + batch, far below n_ctx: the prompt only fit
    # because blocks were compressed between micro-batches
    assert stats["exact_cells"] == 800 < TOKENS  # 4 + 256 + 16 + 512, padded to 32
    before = runs["balanced"]["stats_after_prefix"]
    assert 0 < before["compressed_tokens"] <= stats["compressed_tokens"]


def test_memory_accounting_shows_the_saving(runs):
    stats = runs["balanced"]["stats"]
    f16_bytes_for_n_ctx = stats["exact_bytes"] * N_CTX // stats["exact_cells"]
    total = stats["exact_bytes"] + stats["compressed_bytes"]
    # stock allocates f16 cells for all of n_ctx; the tier allocates 1024 cells plus what it holds
    assert total < 0.4 * f16_bytes_for_n_ctx
    bits = (
        8 * stats["compressed_bytes"] / (stats["compressed_tokens"] * stats["exact_bytes"] / stats["exact_cells"] / 2)
    )
    assert 3.3 < bits < 3.8  # the balanced preset's 3.55 bits per element
    # the streams' storage grows by an eighth (vectors double): what they hold, and at most an eighth
    # and one block more (a block's bound, under twice its f16 bytes) in each of the 2 x 30 streams
    f16_block_all_streams = 16 * stats["exact_bytes"] // stats["exact_cells"]
    assert stats["compressed_bytes"] <= stats["allocated_bytes"]
    assert stats["allocated_bytes"] <= 1.125 * stats["compressed_bytes"] + 2 * f16_block_all_streams


def test_compression_on_stays_within_its_quality_bound(runs):
    reference = runs["stock"]["logits"]
    kld_hi = mean_kld(reference, runs["hi"]["logits"])
    kld_balanced = mean_kld(reference, runs["balanced"]["logits"])
    assert 0 < kld_hi < 0.02
    assert 0 < kld_balanced < 0.05
    assert kld_hi < kld_balanced


def test_flash_attention_off_reads_the_same_tier(runs):
    # without flash attention V is stored transposed: the tier encodes and decodes it transposed
    untimed = lambda stats: {k: v for k, v in stats.items() if not k.endswith("_us")}  # noqa: E731
    assert untimed(runs["balanced-no-fa"]["stats"]) == untimed(runs["balanced"]["stats"])
    kld_fa = mean_kld(runs["stock"]["logits"], runs["balanced"]["logits"])
    kld_no_fa = mean_kld(runs["stock-no-fa"]["logits"], runs["balanced-no-fa"]["logits"])
    # a transposition error would scramble V and multiply the divergence, not shift it a little
    assert 0 < kld_no_fa < 2 * kld_fa


@pytest.mark.parametrize(
    "settings",
    [
        {"OLLAMA_KV_COMPRESSION_PRESET": "balanced"},
        {"OLLAMA_KV_COMPRESSION_PRESET": "hi/lo"},
        {"OLLAMA_KV_COMPRESSION_PRESET": "lo", "OLLAMA_KV_COMPRESSION_LAYERS": "18=hi/balanced 0,7=fine"},
    ],
    ids=["balanced", "hi/lo", "layers"],
)
def test_native_tier_agrees_with_the_offline_evaluator(tmp_path, llama_cpp, model_path, text, settings):
    from kvggml.config import CompressionConfig
    from kvggml.evaluate import Row, evaluate
    from kvggml.plan import KVShape, kvggml_footprint

    n_prefill, n_score = 2048, 512
    env = {"OLLAMA_KV_COMPRESSION": "1", **settings}
    # the prefix in one micro-batch, as the offline evaluator reads it: compression happens after
    # it, so both runs compress the same exact K/V and differ only in where the codec runs
    args = dict(n_ctx=n_prefill + n_score, n_batch=n_prefill, tokens=n_prefill + n_score, logits_last=n_score)
    stock = probe(tmp_path, "stock", **args)
    native = probe(tmp_path, "patched", env, **args)
    offline = evaluate(
        llama_cpp,
        model_path,
        text,
        [Row("kvggml", policy=CompressionConfig.from_env(env))],
        n_prefill=n_prefill,
        n_score=n_score,
        window=512,
        sinks=4,
        n_threads=2,
    )["rows"][0]
    # the same blocks, the same codec bit for bit (K at K's widths, V at V's, each layer at its
    # preset's): the same tokens and bytes compressed, KLD within 20 %
    assert native["stats_after_prefix"]["compressed_tokens"] == offline["compressed_tokens"] == 1520
    assert native["stats_after_prefix"]["compressed_bytes"] == offline["compressed_bytes"]
    # and `kvggml info`'s plan from the GGUF alone bounds them (an all-zero detail group is not stored)
    predicted = kvggml_footprint(
        KVShape.from_gguf(model_path), CompressionConfig.from_env(env), n_prefill + n_score, n_prefill
    )
    assert 0.999 * predicted.compressed_bytes <= offline["compressed_bytes"] <= predicted.compressed_bytes
    native_kld = mean_kld(stock["logits"], native["logits"])
    assert abs(native_kld - offline["kld_mean"]) < 0.2 * offline["kld_mean"], (native_kld, offline["kld_mean"])


@pytest.mark.parametrize(
    "name,value,message",
    [
        (
            "OLLAMA_KV_COMPRESSION_LEVEL",
            "9",
            "OLLAMA_KV_COMPRESSION_LEVEL='9' is out of range: expected an integer from 1 to 6",
        ),
        (
            "OLLAMA_KV_COMPRESSION",
            "yes",
            "OLLAMA_KV_COMPRESSION='yes' is not an integer: expected an integer from 0 to 1",
        ),
        (
            "OLLAMA_KV_COMPRESSION_PRESET",
            "max",
            "OLLAMA_KV_COMPRESSION_PRESET='max' is not allowed: expected one of fine, hi, balanced, lo, or two of "
            "them as K/V, K's preset then V's (e.g. hi/lo)",
        ),
        (
            "OLLAMA_KV_COMPRESSION_PRESET",
            "hi/max",
            "OLLAMA_KV_COMPRESSION_PRESET='hi/max' is not allowed: expected one of fine, hi, balanced, lo, or two "
            "of them as K/V, K's preset then V's (e.g. hi/lo)",
        ),
        (
            "OLLAMA_KV_COMPRESSION_LAYERS",
            "3=hi 30=hi",
            "OLLAMA_KV_COMPRESSION_LAYERS names layer 30, which compression does not apply to: allowed this "
            "model's full-attention layers, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, "
            "20, 21, 22, 23, 24, 25, 26, 27, 28, 29",
        ),
    ],
)
def test_bad_value_fails_context_creation_with_its_name(tmp_path, name, value, message):
    # llama.cpp's log is silenced here, as llama-cpp-python's verbose=False does: the reason still shows
    report = probe(tmp_path, "patched", {**ON, name: value}, logits_last=0)
    assert "could not create a context" in report["error"]
    assert f"kvggml: error: {message}" in report["stderr"]


BAD_LEVEL = "OLLAMA_KV_COMPRESSION_LEVEL='0' is out of range: expected an integer from 1 to 6"
BENCH = ["-p", "16", "-n", "0", "-r", "1"]


@pytest.mark.parametrize(
    "tool,variables,args,message",
    [
        ("llama-bench", {"OLLAMA_KV_COMPRESSION_LEVEL": "0"}, BENCH, BAD_LEVEL),
        ("llama-perplexity", {"OLLAMA_KV_COMPRESSION_LEVEL": "0"}, ["-c", "128"], BAD_LEVEL),
        (
            "llama-bench",
            {"OLLAMA_KV_COMPRESSION": "1"},
            [*BENCH, "-ctk", "q8_0"],
            "OLLAMA_KV_COMPRESSION=1 needs an f16 KV cache; this one is q8_0/f16",
        ),
    ],
)
def test_llama_cpp_tools_show_why_a_context_was_refused(tmp_path, tool, variables, args, message):
    # llama-bench silences llama.cpp's log entirely and said only "failed to create context"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    res = subprocess.run(
        [str(library_dir(PATCHED) / tool), "-m", str(default_model_path()), *args]
        + (["-f", str(text)] if tool == "llama-perplexity" else []),
        env=child_env(**variables),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert f"kvggml: error: {message}" in res.stderr


def test_several_sequences_in_split_caches_share_one_compressed_store(tmp_path):
    # 4 sequences of 128 tokens per 512-token batch, in llama.cpp's default split caches: once
    # refused, now kept in one store, each sequence still holding its 128 tokens
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    res = subprocess.run(
        [str(library_dir(PATCHED) / "llama-perplexity"), "-m", str(default_model_path()), "-c", "128", "-b", "512",
         "-f", str(text)],
        env=child_env(OLLAMA_KV_COMPRESSION="1", OLLAMA_KV_COMPRESSION_THRESHOLD="32"),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Final estimate: PPL" in res.stdout + res.stderr  # every batch of 4 sequences found its cells


def test_callback_reports_each_block_as_the_prompt_is_read(tmp_path):
    report = probe(tmp_path, "patched", ON, logits_last=0, callback="record")
    events, segments = report["events"], report["segments"]
    n_blocks = (TOKENS - 4 - WINDOW) // 16
    assert [(e["p0"], e["p1"]) for e in events] == [(4 + 16 * k, 20 + 16 * k) for k in range(n_blocks)]
    assert all(e["seq_id"] == 0 and e["level"] == 4 and e["bytes_after"] < e["bytes_before"] / 4 for e in events)
    # the segments the API lists are the blocks the callback announced, byte for byte
    assert [(s["p0"], s["p1"], s["bytes"]) for s in segments] == [(e["p0"], e["p1"], e["bytes_after"]) for e in events]
    assert all(s["n_tokens"] == 16 for s in segments)
    assert report["bitmap"] == [True] * n_blocks
    assert sum(s["bytes"] for s in segments) == report["stats"]["compressed_bytes"]


def test_an_exception_in_the_callback_is_reported_not_fatal(tmp_path):
    report = probe(tmp_path, "patched", ON, logits_last=0, callback="raise")
    assert report["callback_errors"] == ["raised by the test's callback"]
    assert "RuntimeError: raised by the test's callback" in report["stderr"]
    assert len(report["events"]) == report["stats"]["blocks"] == (TOKENS - 4 - WINDOW) // 16


def test_the_api_refuses_a_context_without_compression(tmp_path):
    res = run_script("api_without_compression", timeout=120)
    assert (
        "kvggml_get_segments failed: this context does not compress its KV cache "
        "(create it with OLLAMA_KV_COMPRESSION=1)"
    ) in res.stdout
    assert "kvggml_format_sequence failed: this context does not compress its KV cache" in res.stdout
    assert "\nkvggml:enabled 0\n" in res.stdout and "kvggml:blocks 0\n" in res.stdout
    assert "seq_compressed" not in res.stdout


def test_the_api_names_each_bad_argument():
    out = last_json(run_script("api_errors", env=child_env(**ON), timeout=120))
    bad = {name: message for name, (rc, message) in ((k, v) for k, v in out.items() if isinstance(v, list)) if rc == -1}
    assert bad == {
        "get_stats(NULL)": "ctx and out must not be NULL",
        "get_stats(ctx, NULL)": "ctx and out must not be NULL",
        "get_segments(NULL)": "ctx is NULL",
        "get_segments(out NULL, capacity 4)": "out is NULL with a capacity above 0",
        "get_head_reports(NULL)": "ctx is NULL",
        "get_head_reports(out NULL, capacity 4)": "out is NULL with a capacity above 0",
        "get_bitmap(seq -1)": "seq_id must be 0 or above, and bits not NULL with n_bytes above 0",
        "get_bitmap(bits NULL, n_bytes 4)": "seq_id must be 0 or above, and bits not NULL with n_bytes above 0",
        "get_settings(NULL)": "ctx is NULL",
        "get_settings(ctx, NULL)": "out must not be NULL",
        "set_settings(ctx, NULL)": "settings must not be NULL",
        "set_settings(preset unterminated)": "preset is not NUL-terminated",
        "set_compress_callback(NULL)": "ctx is NULL",
        "format_sequence(NULL)": "ctx is NULL",
        "format_sequence(seq -1)": "seq_id -1 is negative: expected a sequence id",
        "format_sequence(buf NULL, size 4)": "buf is NULL with a size above 0",
        "format_metrics(NULL)": "ctx is NULL",
        "format_metrics(n_seq -1)": "n_seq -1 is negative: expected 0 or more",
    }
    # a buffer too small is no error: the count of all, and the first segment written
    assert out["get_segments(capacity 1)"][0] == (600 - 4 - WINDOW) // 16
    assert out["first_segment"] == [4, 20]
    # 30 layers x 3 KV heads; the second is layer 0's head 1, over every block, none coarsened
    assert out["get_head_reports(capacity 2)"][0] == 90
    second = out["second_head"]
    assert (second["layer"], second["head"], second["blocks"], second["steps"]) == (0, 1, (600 - 4 - WINDOW) // 16, 0)
    assert second["bytes"] > 0
    assert out["native.get_stats(0)"] == "ctx is a null llama_context pointer"
    assert out["format_sequence(size 12)"][0] == len(out["format_sequence"]) > 12
    assert out["format_sequence(size 12) wrote"] == out["format_sequence"][:11]


def test_sequence_operations_follow_the_compressed_blocks():
    out = last_json(run_script("sequences", env=child_env(**ON)))
    n_blocks = (800 - 4 - WINDOW) // 16
    assert len(out["seq0"]) == len(out["seq1"]) == n_blocks
    # the texts for hosts (llama-server's log and /metrics) count what the segments and stats count
    metrics = native.parse_metrics(out["metrics"])
    stats = out["stats"]
    names = (
        "exact_cells",
        "exact_bytes",
        "compressed_bytes",
        "allocated_bytes",
        "compressed_tokens",
        "blocks",
        "budget_bytes",
    )
    for name in names:
        assert float(metrics[f"kvggml:{name}"]) == stats[name], name
    assert float(metrics["kvggml:encode_seconds_total"]) == stats["encode_us"] / 1e6
    f16 = stats["compressed_tokens"] * stats["exact_bytes"] / stats["exact_cells"]
    assert float(metrics["kvggml:compression_ratio"]) == pytest.approx(f16 / stats["compressed_bytes"])
    for seq in (0, 1):
        tokens = sum(s[2] for s in out[f"seq{seq}"])
        mib = sum(s[3] for s in out[f"seq{seq}"]) / 2**20
        assert float(metrics[f'kvggml:seq_compressed_tokens{{seq="{seq}"}}']) == tokens
        assert float(metrics[f'kvggml:seq_compressed_bytes{{seq="{seq}"}}']) == sum(s[3] for s in out[f"seq{seq}"])
        assert out["lines"][seq].startswith(
            f"kvggml: seq {seq}: {tokens} tokens compressed in {n_blocks} blocks, {mib:.2f} MiB ("
        )
    assert out["after_keep"] == [out["seq0"], []]
    assert out["after_cp"] == out["seq0"]
    # sequence 0 after keep decodes as a fresh context fed only its tokens
    assert out["same_top1"] == 1.0 and out["max_logit_diff"] < 0.5
