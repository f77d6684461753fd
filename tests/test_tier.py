"""The compressed tier inside the patched llama.cpp, on the default model.

Each run is its own process (tests/probe.py): stock and patched libllama cannot share one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax

PROBE = Path(__file__).with_name("probe.py")
# Small but real: 1536 tokens with a 256-token window crosses the threshold many times.
N_CTX, TOKENS, LAST, WINDOW = 4096, 1536, 64, 256


def probe(tmp_path: Path, lib: str, compression: dict | None = None, **args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_KV_COMPRESSION")}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    env["KVGGML_LIB"] = lib
    env.update(compression or {})
    params = {"n_ctx": N_CTX, "tokens": TOKENS, "logits_last": LAST, "out": str(tmp_path / f"{lib}-{len(os.listdir(tmp_path))}.npy"), **args}
    res = subprocess.run([sys.executable, str(PROBE), json.dumps(params)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["stderr"] = res.stderr
    if "error" not in report and params["logits_last"]:
        report["logits"] = np.load(params["out"])
    return report


def mean_kld(reference: np.ndarray, other: np.ndarray) -> float:
    p = log_softmax(reference.astype(np.float64), axis=-1)
    q = log_softmax(other.astype(np.float64), axis=-1)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


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
    bits = 8 * stats["compressed_bytes"] / (stats["compressed_tokens"] * stats["exact_bytes"] / stats["exact_cells"] / 2)
    assert 3.3 < bits < 3.8  # the balanced preset's 3.55 bits per element


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


def test_native_tier_agrees_with_the_offline_evaluator(tmp_path, llama_cpp, model_path, text):
    from kvggml.evaluate import Row, evaluate

    n_prefill, n_score = 2048, 512
    # the prefix in one micro-batch, as the offline evaluator reads it: compression happens after
    # it, so both runs compress the same exact K/V and differ only in where the codec runs
    args = dict(n_ctx=n_prefill + n_score, n_batch=n_prefill, tokens=n_prefill + n_score, logits_last=n_score)
    stock = probe(tmp_path, "stock", **args)
    native = probe(tmp_path, "patched", {"OLLAMA_KV_COMPRESSION": "1"}, **args)
    offline = evaluate(llama_cpp, model_path, text, [Row.parse("haar")], n_prefill=n_prefill, n_score=n_score,
                       window=512, sinks=4, n_threads=2)["rows"][0]
    # the same blocks, the same codec bit for bit: same tokens compressed, KLD within 20 %
    assert native["stats_after_prefix"]["compressed_tokens"] == offline["compressed_tokens"] == 1520
    native_kld = mean_kld(stock["logits"], native["logits"])
    assert abs(native_kld - offline["kld_mean"]) < 0.2 * offline["kld_mean"], (native_kld, offline["kld_mean"])


@pytest.mark.parametrize("name,value,message", [
    ("OLLAMA_KV_COMPRESSION_LEVEL", "9", "OLLAMA_KV_COMPRESSION_LEVEL='9' is out of range: expected an integer from 1 to 6"),
    ("OLLAMA_KV_COMPRESSION", "yes", "OLLAMA_KV_COMPRESSION='yes' is not an integer: expected an integer from 0 to 1"),
    ("OLLAMA_KV_COMPRESSION_PRESET", "max", "OLLAMA_KV_COMPRESSION_PRESET='max' is not allowed: expected one of hi, balanced, lo"),
])
def test_bad_value_fails_context_creation_with_its_name(tmp_path, name, value, message):
    report = probe(tmp_path, "patched", {**ON, name: value}, logits_last=0, show_logs=True)
    assert "could not create a context" in report["error"]
    assert message in report["stderr"]


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
    code = ("import json; from kvggml.library import load_llama_cpp; from kvggml import native\n"
            "from kvggml.model import Runner, default_model_path, silence_llama_logs\n"
            "ll = load_llama_cpp(); silence_llama_logs(ll)\n"
            "with Runner(ll, default_model_path(), n_ctx=256) as run:\n"
            "    try:\n        native.get_segments(run.ctx, 0)\n    except RuntimeError as e:\n        print(e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_KV_COMPRESSION")}
    res = subprocess.run([sys.executable, "-c", code], env={**env, "KVGGML_LIB": "patched"}, capture_output=True,
                         text=True, timeout=120)
    assert ("kvggml_get_segments failed: this context does not compress its KV cache "
            "(create it with OLLAMA_KV_COMPRESSION=1)") in res.stdout


SEQUENCES = """
import json, numpy as np
from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, silence_llama_logs
from kvggml import native
ll = load_llama_cpp(); silence_llama_logs(ll)
out = {}
with Runner(ll, default_model_path(), n_ctx=4096, n_seq_max=2, n_threads=2) as run:
    text = run.tokenize(default_text())
    a, b = text[:800], text[2000:2800]
    run.decode(a, 0, seq_id=0)
    run.decode(b, 0, seq_id=1)
    seg = lambda s: [(x["p0"], x["p1"], x["n_tokens"], x["bytes"]) for x in native.get_segments(run.ctx, s)]
    out["seq0"], out["seq1"] = seg(0), seg(1)
    ll.llama_memory_seq_keep(run.memory, 0)
    out["after_keep"] = (seg(0), seg(1))
    ll.llama_memory_seq_cp(run.memory, 0, 1, -1, -1)
    out["after_cp"] = seg(1)
    kept = run.decode(text[800:832], 800, want_logits=True, seq_id=0)
with Runner(ll, default_model_path(), n_ctx=4096, n_threads=2) as fresh:
    fresh.decode(a, 0)
    alone = fresh.decode(text[800:832], 800, want_logits=True)
out["same_top1"] = float((kept.argmax(-1) == alone.argmax(-1)).mean())
out["max_logit_diff"] = float(np.abs(kept - alone).max())
print(json.dumps(out))
"""


def test_sequence_operations_follow_the_compressed_blocks():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_KV_COMPRESSION")}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    env.update({"KVGGML_LIB": "patched", **ON})
    res = subprocess.run([sys.executable, "-c", SEQUENCES], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    n_blocks = (800 - 4 - WINDOW) // 16
    assert len(out["seq0"]) == len(out["seq1"]) == n_blocks
    assert out["after_keep"] == [out["seq0"], []]
    assert out["after_cp"] == out["seq0"]
    # sequence 0 after keep decodes as a fresh context fed only its tokens
    assert out["same_top1"] == 1.0 and out["max_logit_diff"] < 0.5
