"""The offline evaluator on real models: exact when nothing changes, honest when something does."""

from __future__ import annotations

import json
import platform

import pytest
from conftest import child_env, run_cli

from kvggml.evaluate import Row, evaluate
from kvggml.kvstate import KVState
from kvggml.model import Runner, gemma3_model_path

SMALL = dict(n_prefill=384, n_score=96, window=128, sinks=4, n_threads=2)


@pytest.fixture(scope="module")
def report(llama_cpp, model_path, text):
    rows = [
        Row.parse(s)
        for s in [
            *("identity", "f16", "haar-16", "haar", "haar-lo", "evict", "stock:q8_0", "stock:q4_0"),
            *("f16@3=haar-lo", "haar-lo@3=f16"),  # one layer of SmolLM2's 30 apart
        ]
    ]
    return {r["label"]: r for r in evaluate(llama_cpp, model_path, text, rows, **SMALL)["rows"]}


def test_unchanged_cache_gives_exactly_zero_divergence(report):
    for label in ("identity", "f16"):
        assert report[label]["kld_mean"] == 0.0 and report[label]["top1_agree"] == 1.0
        assert report[label]["dppl_pct"] == 0.0 and report[label]["kv_ratio_f16"] == 1.0


def test_codec_rows_compress_only_old_whole_blocks(report):
    # 384 tokens - 4 sinks - 128 window = 252 old tokens -> 15 blocks of 16
    assert report["haar"]["compressed_tokens"] == 240
    assert report["evict"]["compressed_tokens"] == 252  # token by token: no blocks
    assert 3.4 < report["haar"]["bits_per_element"] < 3.7
    assert report["haar-lo"]["kv_ratio_f16"] < report["haar"]["kv_ratio_f16"] < 1.0


def test_coarser_codecs_cost_more_quality(report):
    assert report["haar-16"]["kld_mean"] > 0.0  # any change is visible: the harness is not blind
    assert report["haar-lo"]["kld_mean"] > report["haar-16"]["kld_mean"]
    assert report["evict"]["kld_mean"] > report["haar-16"]["kld_mean"]
    assert report["stock:q4_0"]["kld_mean"] > report["stock:q8_0"]["kld_mean"]


def test_a_layer_set_apart_takes_its_own_codec(report):
    """Layer 3 alone through haar-lo, and every layer but 3: the two together store what f16 and haar-lo
    store for every layer, and each costs part of what haar-lo on every layer costs."""
    one, rest = report["f16@3=haar-lo"], report["haar-lo@3=f16"]
    assert one["compressed_tokens"] == rest["compressed_tokens"] == report["haar-lo"]["compressed_tokens"] == 240
    f16_blocks = report["f16"]["compressed_bytes"] * 240 // 252  # f16 compressed token by token: 252 old tokens
    assert one["compressed_bytes"] + rest["compressed_bytes"] == f16_blocks + report["haar-lo"]["compressed_bytes"]
    assert f16_blocks * 29 // 30 < one["compressed_bytes"] < f16_blocks
    assert 0 < report["f16@3=haar-lo"]["kld_mean"] < report["haar-lo@3=f16"]["kld_mean"] < report["haar-lo"]["kld_mean"]


def test_a_layer_compression_does_not_apply_to_is_named_before_anything_runs(llama_cpp, model_path, monkeypatch):
    with pytest.raises(ValueError, match="layer 30 is not one that compression applies to: allowed the model's full"):
        evaluate(llama_cpp, model_path, "never read", [Row.parse("haar@30=haar-lo")], **SMALL)
    # the library's policy row, with OLLAMA_KV_COMPRESSION_LAYERS
    monkeypatch.setenv("OLLAMA_KV_COMPRESSION_LAYERS", "3=hi 30=hi")
    with pytest.raises(ValueError, match="row 'kvggml': layer 30 is not one that compression applies to"):
        evaluate(llama_cpp, model_path, "never read", [Row.parse("kvggml")], **SMALL)


def test_too_short_text_is_a_clear_error(llama_cpp, model_path):
    with pytest.raises(ValueError, match=r"the text has \d+ tokens; N \+ M \+ 1 = 481 are needed"):
        evaluate(llama_cpp, model_path, "too short", [Row.parse("identity")], **SMALL)


def test_unknown_row_is_a_clear_error():
    with pytest.raises(ValueError, match="stock cache type must be one of f16, q8_0, q4_0"):
        Row.parse("stock:q5_0")
    with pytest.raises(ValueError, match="unknown codec 'nonsense'"):
        Row.parse("nonsense")


def test_guidance_is_refused_offline_rather_than_run_as_age_order(monkeypatch):
    monkeypatch.setenv("OLLAMA_KV_COMPRESSION_GUIDANCE", "1")
    with pytest.raises(ValueError, match="OLLAMA_KV_COMPRESSION_GUIDANCE=1 is not modelled offline"):
        Row.parse("kvggml")


def test_sliding_window_model_compresses_its_full_attention_cache(llama_cpp, text):
    model = gemma3_model_path()
    with Runner(llama_cpp, model, n_ctx=640, n_batch=256, n_threads=2) as run:
        run.decode(run.tokenize(text)[:300], 0)
        state = KVState.parse(run.get_state())
    assert state.n_parts == 2  # full-attention cache, then the sliding-window cache
    rows = [Row.parse(s) for s in ["identity", "haar"]]
    report = evaluate(llama_cpp, model, text, rows, n_prefill=384, n_score=64, window=128, sinks=4, n_threads=2)
    by = {r["label"]: r for r in report["rows"]}
    assert by["identity"]["kld_mean"] == 0.0
    assert by["haar"]["compressed_tokens"] == 240 and by["haar"]["kld_mean"] > 0.0


def test_cli_writes_table_json_and_plot(tmp_path):
    res = run_cli(
        "eval",
        "-n",
        "256",
        "-m",
        "64",
        "--window",
        "64",
        "--threads",
        "2",
        "--rows",
        "identity",
        "haar",
        "--out",
        str(tmp_path),
        env=child_env("stock"),
    )
    assert res.returncode == 0, res.stderr
    assert "| identity | " in res.stdout and "| haar | " in res.stdout
    data = json.loads((tmp_path / "eval-SmolLM2-135M-Instruct.Q4_1-N256.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["identity", "haar"]
    png = (tmp_path / "eval-SmolLM2-135M-Instruct.Q4_1-N256.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_cli_rejects_bad_environment():
    res = run_cli("eval", env=child_env("stock", OLLAMA_KV_COMPRESSION_THRESHOLD="lots"), timeout=60)
    assert res.returncode == 2
    assert (
        "OLLAMA_KV_COMPRESSION_THRESHOLD='lots' is not an integer: expected an integer from 0 to 16777216" in res.stderr
    )


@pytest.mark.parametrize("lib", ["stock", "patched"])
def test_info_names_the_cpu_features_of_the_build_and_the_codec(lib):
    res = run_cli("info", "--json", env=child_env(lib), timeout=120)
    assert res.returncode == 0, res.stderr
    cpu = json.loads(res.stdout)["cpu"]
    assert cpu["host"]["model"] and "SSE3" in cpu["build_features"]
    assert not any(f.startswith("AMX") for f in cpu["build_features"])  # built without AMX kernels
    if platform.machine() == "x86_64":
        assert "-mno-amx-int8" in cpu["build_c_flags"]
    if lib == "stock":
        assert cpu["codec_kernels"] is None
    elif {"avx512bw", "avx512vbmi", "f16c"} <= set(cpu["host"]["flags"]):
        assert cpu["codec_kernels"] == "avx512vbmi avx2 f16c"
    elif {"avx2", "f16c"} <= set(cpu["host"]["flags"]):
        assert cpu["codec_kernels"] == "avx2 f16c"
    else:
        assert cpu["codec_kernels"] in ("avx2", "f16c", "portable")
