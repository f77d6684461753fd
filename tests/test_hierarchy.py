"""The resolution hierarchy in the patched library: coarsening by age (OLLAMA_KV_COMPRESSION_SCHEDULE)
and under a memory budget (OLLAMA_KV_COMPRESSION_BUDGET), on the default model.

The coarsening of one block is checked bit for bit in tests/test_codec.py and test_c_codec.py, the
memory operations over coarsened blocks in tests/test_memory_ops.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import child_env, last_json, run_script
from test_config import BAD_VALUES
from test_tier import ON, TOKENS, probe

from kvggml.config import CompressionConfig, ConfigError
from kvggml.metrics import mean_kld

SCHEDULE = {"OLLAMA_KV_COMPRESSION_SCHEDULE": "512:6.4.3.3.0,1024:6.4.3.0.0"}


@pytest.mark.parametrize(
    "name,value",
    [
        (n, v)
        for n, v, _ in BAD_VALUES
        if n in ("OLLAMA_KV_COMPRESSION_SCHEDULE", "OLLAMA_KV_COMPRESSION_BUDGET", "OLLAMA_KV_COMPRESSION_LAYERS")
    ],
)
def test_the_library_refuses_a_bad_setting_as_python_does(tmp_path, name, value):
    with pytest.raises(ConfigError) as err:
        CompressionConfig.from_env({name: value})
    report = probe(tmp_path, "patched", {**ON, name: value}, logits_last=0)
    assert "could not create a context" in report["error"]
    assert f"kvggml: error: {err.value}" in report["stderr"]


def test_guidance_refuses_a_schedule_step_that_narrows_a_subband(tmp_path):
    # guidance steps each KV head on its own, and a head can only drop a subband (FORMAT section 11)
    env = {"OLLAMA_KV_COMPRESSION_GUIDANCE": "1", "OLLAMA_KV_COMPRESSION_SCHEDULE": "512:6.4.3.3.0,1024:6.4.3.2.0"}
    with pytest.raises(ConfigError) as err:
        CompressionConfig.from_env(env)
    assert "step '1024:6.4.3.2.0' narrows subband 3 from 3 to 2 bits" in str(err.value)
    assert "a step may only drop subbands: 0 or 3" in str(err.value)
    report = probe(tmp_path, "patched", {**ON, **env}, logits_last=0)
    assert "could not create a context" in report["error"]
    assert f"kvggml: error: {err.value}" in report["stderr"]
    assert CompressionConfig.from_env({**env, "OLLAMA_KV_COMPRESSION_GUIDANCE": "0"}).schedule


def test_a_budget_that_cannot_hold_n_ctx_is_refused_with_the_least_it_needs(tmp_path):
    report = probe(tmp_path, "patched", {**ON, "OLLAMA_KV_COMPRESSION_BUDGET": "0.1"}, logits_last=0)
    assert "could not create a context" in report["error"]
    # n_ctx 4096: f16 cells of 800 tokens, and 256 blocks with only A_L and D_L left
    assert (
        "kvggml: error: OLLAMA_KV_COMPRESSION_BUDGET is 9437184 bytes, below what this context can need: "
        in report["stderr"]
    )
    assert (
        "(18432000 in exact cells, every block at its coarsest widths 6.4.0.0.0): allowed at least" in report["stderr"]
    )


def test_the_schedule_coarsens_blocks_as_they_age_and_reports_each_step(tmp_path):
    report = probe(tmp_path, "patched", {**ON, **SCHEDULE}, logits_last=0, callback="record")
    segments, events = report["segments"], report["events"]
    # ages are counted from the newest token, TOKENS - 1
    assert [s["step"] for s in segments] == [
        2 if TOKENS - s["p1"] >= 1024 else 1 if TOKENS - s["p1"] >= 512 else 0 for s in segments
    ]
    widths = {0: [6, 4, 3, 3, 3], 1: [6, 4, 3, 3, 0], 2: [6, 4, 3, 0, 0]}
    assert all(s["bits"] == widths[s["step"]] for s in segments)
    assert report["step_map"] == [s["step"] + 1 for s in segments]
    # every step is an event, with the block's size before and after; the last event of a block is its segment
    coarsened = [e for e in events if e["step"] > 0]
    assert len(coarsened) == report["stats"]["coarsenings"] == sum(s["step"] for s in segments)
    assert all(e["bytes_after"] < 0.7 * e["bytes_before"] for e in coarsened)
    last = {(e["p0"], e["p1"]): (e["step"], e["bytes_after"]) for e in events}
    assert [last[s["p0"], s["p1"]] for s in segments] == [(s["step"], s["bytes"]) for s in segments]


def test_the_budget_holds_after_every_micro_batch_while_the_context_fills():
    n_ctx, budget = 2048, 0.25
    env = child_env(**ON, OLLAMA_KV_COMPRESSION_BUDGET=str(budget))
    out = last_json(run_script("budget", str(n_ctx), "1200", "64", env=env, timeout=900))
    stats = out["stats"]
    assert out["positions"] == n_ctx and out["callback_errors"] == []
    assert stats["budget_bytes"] == int(budget * stats["exact_bytes"] / stats["exact_cells"] * n_ctx)
    assert len(out["totals"]) == 1200 // 64 + 1 + n_ctx - 1200
    assert max(out["totals"]) <= stats["budget_bytes"]
    # the budget was binding: the oldest blocks coarsened first, down the preset's ladder
    steps = out["steps"]
    assert stats["coarsenings"] > 0 and steps == sorted(steps, reverse=True) and steps[0] == 3
    assert out["totals"][-1] > 0.97 * stats["budget_bytes"]


@pytest.mark.parametrize(
    "presets",
    [
        {"OLLAMA_KV_COMPRESSION_PRESET": "balanced"},
        {"OLLAMA_KV_COMPRESSION_PRESET": "hi/lo"},
        {"OLLAMA_KV_COMPRESSION_LAYERS": "18=hi/lo 3=lo"},
    ],
    ids=["balanced", "hi/lo", "layers"],
)
def test_the_offline_evaluator_runs_the_same_policy(tmp_path, llama_cpp, model_path, text, monkeypatch, presets):
    from kvggml.evaluate import Row, evaluate

    n_prefill, n_score = 2048, 512
    # the schedule's later steps are the budget's: no block is that old. With hi/lo (or a layer's
    # preset) each step narrows K and V to at most its widths, each from its own preset's.
    hierarchy = {
        **presets,
        "OLLAMA_KV_COMPRESSION_SCHEDULE": "1024:6.4.3.3.0,1000000:6.4.3.0.0,2000000:6.4.0.0.0",
        # the exact cells (all 2560: a 2048-token batch) and 4.5 MB of blocks
        "OLLAMA_KV_COMPRESSION_BUDGET": str(2560 * 23040 + 4_500_000),
    }
    args = dict(n_ctx=n_prefill + n_score, n_batch=n_prefill, tokens=n_prefill + n_score, logits_last=n_score)
    stock = probe(tmp_path, "stock", **args)
    native = probe(tmp_path, "patched", {"OLLAMA_KV_COMPRESSION": "1", **hierarchy}, callback="record", **args)
    for name, value in hierarchy.items():
        monkeypatch.setenv(name, value)
    offline = evaluate(
        llama_cpp, model_path, text, [Row.parse("kvggml")], n_prefill, n_score, 512, 4, n_threads=2, n_batch=n_prefill
    )["rows"][0]
    # the same blocks at the same steps, coded bit for bit alike: the same bytes
    after_prefix = native["stats_after_prefix"]
    assert after_prefix["compressed_tokens"] == offline["compressed_tokens"] == 1520
    assert after_prefix["compressed_bytes"] == offline["compressed_bytes"]
    assert after_prefix["coarsenings"] == sum(k * n for k, n in enumerate(offline["blocks_per_step"]))
    # the youngest as encoded, older ones at the schedule's step, the oldest taken down by the budget
    young, scheduled, _, oldest = offline["blocks_per_step"]
    assert young > 0 and scheduled > 0 and oldest > 0
    native_kld = mean_kld(stock["logits"], native["logits"])
    assert abs(native_kld - offline["kld_mean"]) < 0.2 * offline["kld_mean"], (native_kld, offline["kld_mean"])


def test_guidance_keeps_a_passage_read_again_finer_than_age_order_does(tmp_path):
    # a passage read again at the end: induction heads attend to its first reading, so guidance
    # should spare its blocks, which age order (the oldest first) coarsens among the first
    prefix, passage = 2560, (256, 768)
    args = dict(n_ctx=4096, tokens=prefix, repeat=list(passage), logits_last=0, callback="record")
    # the budget is what the prefix holds: the repeat's blocks are paid for by coarsening
    filled = probe(tmp_path, "patched", ON, n_ctx=4096, tokens=prefix, logits_last=0)["stats"]
    budget = {"OLLAMA_KV_COMPRESSION_BUDGET": str(filled["exact_bytes"] + filled["compressed_bytes"])}
    runs = {
        guided: probe(
            tmp_path, "patched", {**ON, **budget, "OLLAMA_KV_COMPRESSION_GUIDANCE": guided}, **args, restore=True
        )
        for guided in ("0", "1")
    }

    def mean_bytes(report: dict, in_passage: bool) -> float:
        held = [s for s in report["segments"] if s["p1"] <= prefix]
        sizes = [s["bytes"] for s in held if (passage[0] <= s["p0"] < passage[1]) == in_passage]
        return sum(sizes) / len(sizes)

    age, guided = runs["0"], runs["1"]
    for report in (age, guided):
        stats, heads = report["stats"], report["heads"]
        assert stats["compressed_bytes"] + stats["exact_bytes"] <= stats["budget_bytes"]
        # one report per layer and KV head (30 x 3); their scales and values are most of the blocks' bytes
        assert [(h["layer"], h["head"]) for h in heads] == [(il, h) for il in range(30) for h in range(3)]
        assert 0.85 * stats["compressed_bytes"] < sum(h["bytes"] for h in heads) < stats["compressed_bytes"]
    # age order steps whole blocks: every head the same; guidance steps heads one at a time
    assert all(h["attention"] is None for h in age["heads"])
    assert sum(h["steps"] for h in age["heads"]) == 90 * age["stats"]["coarsenings"]
    assert sum(h["steps"] for h in guided["heads"]) == guided["stats"]["coarsenings"] > 50 * 90
    # per-head rates: the heads that attend least to the old blocks gave up the most steps
    attention = np.array([h["attention"] for h in guided["heads"]])
    steps = np.array([h["steps"] for h in guided["heads"]], float)
    assert np.corrcoef(np.argsort(np.argsort(attention)), np.argsort(np.argsort(steps)))[0, 1] < -0.5
    # measured: heads that barely look back coarsened every block to the end of the ladder (3 steps
    # each), the most attentive kept every block as encoded
    n_blocks = guided["heads"][0]["blocks"]
    assert steps.min() == 0 and steps.max() > 2 * n_blocks
    # a saved state carries each head's steps (version 4): loaded back, every head holds what it did
    for report in (age, guided):
        restored = report["restored_heads"]
        assert [(h["steps"], h["bytes"]) for h in restored] == [(h["steps"], h["bytes"]) for h in report["heads"]]
        assert report["restored_logits_equal"]
    # age order takes the passage's old blocks down first; guidance keeps more of them
    assert mean_bytes(age, True) < mean_bytes(age, False)
    assert mean_bytes(guided, True) > 1.2 * mean_bytes(age, True)
