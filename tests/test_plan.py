"""`kvggml info --model`: the KV memory a model needs, planned from its GGUF alone.

The prediction is checked against the library's own accounting in tests/test_memory_ops.py."""

from __future__ import annotations

import pytest
from conftest import child_env, run_cli

from kvggml.config import CompressionConfig
from kvggml.model import default_model_path, gemma3_model_path
from kvggml.plan import (
    KVShape,
    PlanError,
    kvggml_footprint,
    longest_context,
    parse_bytes,
    plan,
    settings,
    stock_footprint,
)

pytestmark = pytest.mark.fast
MIB = 1 << 20


def test_the_shapes_of_both_models():
    smollm2 = KVShape.from_gguf(default_model_path())
    assert (len(smollm2.sliding), set(smollm2.k_widths), any(smollm2.sliding)) == (30, {192}, False)
    gemma3 = KVShape.from_gguf(gemma3_model_path())
    assert [il for il, s in enumerate(gemma3.sliding) if not s] == [5, 11, 17]  # 3 of 18 layers are global
    assert (gemma3.n_swa, set(gemma3.k_widths), gemma3.context_length) == (512, {256}, 32768)


def test_stock_sizes_follow_llama_cpp():
    shape = KVShape.from_gguf(default_model_path())
    assert stock_footprint(shape, "f16", 8192).total == 180 * MIB  # 8192 cells x 30 layers x (192 + 192) x 2 bytes
    assert stock_footprint(shape, "f16", 8000).total == 180 * MIB  # contexts are padded to 256
    assert stock_footprint(shape, "q4_0", 8192).total == 180 * MIB * 18 // 64
    gemma3 = KVShape.from_gguf(gemma3_model_path())
    # the window layers hold min(n_ctx, 512 + 512) cells, padded to 256
    assert stock_footprint(gemma3, "f16", 32768).window_bytes == 1024 * 15 * 512 * 2


def test_kvggml_exact_cells_stop_growing_and_blocks_grow_with_the_context():
    shape = KVShape.from_gguf(default_model_path())
    config = CompressionConfig(enabled=True)
    small, large = kvggml_footprint(shape, config, 4096), kvggml_footprint(shape, config, 16384)
    assert small.exact_bytes == large.exact_bytes == 1056 * 30 * 384 * 2  # 4 + 512 + 16 + 512, padded to 32
    assert large.compressed_bytes > 4 * small.compressed_bytes
    short = kvggml_footprint(shape, config, 400)  # nothing old enough to compress, cells capped at n_ctx
    assert (short.exact_bytes, short.compressed_bytes) == (512 * 30 * 384 * 2, 0)


def test_the_longest_context_is_the_largest_that_fits():
    assert longest_context(lambda n: 3 * n, 100) == 33
    shape = KVShape.from_gguf(default_model_path())
    config = CompressionConfig(enabled=True)
    report = plan(default_model_path(), 8192, config, memory=64 * MIB)
    footprint_at = settings(shape, config)
    for row in report["settings"]:
        n = row["longest_context"]
        assert footprint_at[row["setting"]](n).total <= 64 * MIB < footprint_at[row["setting"]](n + 1).total
    by = {row["setting"]: row["longest_context"] for row in report["settings"]}
    assert by["kvggml balanced"] > by["stock q8_0"] > by["stock f16"]


def test_a_layer_with_a_preset_of_its_own_is_planned_with_it():
    shape = KVShape.from_gguf(default_model_path())
    at = settings(shape, CompressionConfig.from_env({"OLLAMA_KV_COMPRESSION_LAYERS": "18=hi"}))
    base, hi, layered = (at[name](8192) for name in ("kvggml balanced", "kvggml hi", "kvggml balanced;LAYERS=18=hi"))
    # SmolLM2's 30 layers are alike: one at hi is a thirtieth of the way from balanced's blocks to hi's
    assert layered.compressed_bytes - base.compressed_bytes == (hi.compressed_bytes - base.compressed_bytes) // 30 > 0
    assert layered.exact_bytes == base.exact_bytes


@pytest.mark.parametrize(
    "raw,size", [("2GiB", 2 << 30), ("512 MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("4096", 4096)]
)
def test_sizes_parse(raw, size):
    assert parse_bytes(raw) == size


@pytest.mark.parametrize("raw", ["lots", "2 GiBs", "-1GiB", "0"])
def test_bad_sizes_name_themselves(raw):
    with pytest.raises(PlanError, match=rf"--memory '{raw}'"):
        parse_bytes(raw)


def test_cli_plans_without_a_build_and_names_bad_input(tmp_path):
    res = run_cli(
        "info",
        "--model",
        str(default_model_path()),
        "--ctx",
        "16384",
        "--memory",
        "1GiB",
        env=child_env(KVGGML_BUILD_DIR=str(tmp_path)),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "| stock q4_0 | 101.2 | 0.281 |" in res.stdout and "| kvggml balanced |" in res.stdout
    bad = run_cli("info", "--model", str(default_model_path()), "--memory", "lots", timeout=60)
    assert bad.returncode == 2 and "--memory: is not a size" in bad.stderr
    missing = run_cli("info", "--model", str(tmp_path / "missing.gguf"), timeout=60)
    assert missing.returncode == 2 and f"--model {tmp_path / 'missing.gguf'}: no such file" in missing.stderr
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    res = run_cli("info", "--model", str(not_gguf), timeout=60)
    assert res.returncode == 2 and f"--model {not_gguf}: not a readable GGUF file" in res.stderr
