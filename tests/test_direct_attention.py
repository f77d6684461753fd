"""Attention straight from the compressed blocks (kvggml/csrc/attention-direct.cpp) against the
reference path, which decodes every block to f16 and runs llama.cpp's own attention.

Micro-batches of up to 32 tokens take the direct path; the prompt (512-token micro-batches) takes
the reference one in both runs, so the runs differ only in how the decoded tokens attend.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.linalg
from conftest import child_env, run_script
from test_tier import ON, TOKENS, probe

from kvggml.codecs.haar_format import decode_block
from kvggml.kvstate import KVState
from kvggml.metrics import mean_kld

# the last 48 tokens decoded one at a time, over about 1,300 compressed tokens
ARGS = dict(tail_batch=1, logits_last=48)
DIRECT, REFERENCE = {"OLLAMA_KV_COMPRESSION_DIRECT": "1"}, {"OLLAMA_KV_COMPRESSION_DIRECT": "0"}
# a budget that coarsens most old blocks: blocks of mixed levels, with dropped subbands
MIXED = {"OLLAMA_KV_COMPRESSION_BUDGET": "0.245"}
# guidance under that budget: each KV head of a block steps on its own (FORMAT.md section 11)
PER_HEAD = {**MIXED, "OLLAMA_KV_COMPRESSION_GUIDANCE": "1"}
# guidance on, under a budget this prompt never reaches: the same blocks as without it
GUIDED = {"OLLAMA_KV_COMPRESSION_GUIDANCE": "1", "OLLAMA_KV_COMPRESSION_BUDGET": "0.9"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direct")
    return {
        "stock": probe(tmp, "stock", **ARGS),
        "direct": probe(tmp, "patched", {**ON, **DIRECT}, **ARGS),
        "direct-1-thread": probe(tmp, "patched", {**ON, **DIRECT}, threads=1, **ARGS),
        "reference": probe(tmp, "patched", {**ON, **REFERENCE}, **ARGS),
        "reference-no-fa": probe(tmp, "patched", {**ON, **REFERENCE}, flash_attn=False, **ARGS),
        "direct-no-fa": probe(tmp, "patched", {**ON, **DIRECT}, flash_attn=False, **ARGS),
        "mixed-direct": probe(tmp, "patched", {**ON, **DIRECT, **MIXED}, **ARGS),
        "mixed-reference": probe(tmp, "patched", {**ON, **REFERENCE, **MIXED}, **ARGS),
        "guided-direct": probe(tmp, "patched", {**ON, **DIRECT, **GUIDED}, **ARGS),
        **{
            f"per-head-{name}": probe(tmp, "patched", {**ON, **path, **PER_HEAD}, callback="record", **ARGS)
            for name, path in (("direct", DIRECT), ("reference", REFERENCE))
        },
    }


def test_direct_attention_agrees_with_the_reference_as_closely_as_its_own_two_attention_kernels(runs):
    # The reference rounds queries and softmax weights to f16 (llama.cpp's f16 kernels), the direct
    # path keeps f32: they cannot agree bit for bit. The yardstick is how far the reference moves
    # between llama.cpp's two attention kernels (flash attention on and off) on the same tier.
    yardstick = mean_kld(runs["reference"]["logits"], runs["reference-no-fa"]["logits"])
    assert 0 < yardstick < 0.02
    assert mean_kld(runs["reference"]["logits"], runs["direct"]["logits"]) < 2 * yardstick
    # flash attention changes the layout of V (transposed without it); the direct path reads both
    assert mean_kld(runs["reference-no-fa"]["logits"], runs["direct-no-fa"]["logits"]) < 2 * yardstick


@pytest.mark.parametrize("model,tokens", [("smollm2", 3072), ("gemma3", 1536), ("gemma3", 3072)])
def test_direct_attention_agrees_with_the_reference_on_both_models_at_several_depths(tmp_path, model, tokens):
    # Gemma 3: GQA with 4 query heads per KV head, and only its 3 full-attention layers compressed
    args = {**ARGS, "tokens": tokens, "model": model}
    reference = probe(tmp_path, "patched", {**ON, **REFERENCE}, **args)
    reference_no_fa = probe(tmp_path, "patched", {**ON, **REFERENCE}, flash_attn=False, **args)
    direct = probe(tmp_path, "patched", {**ON, **DIRECT}, **args)
    assert direct["stats"]["compressed_tokens"] > tokens - ARGS["logits_last"] - 2 * 256
    # On Gemma the compressed runs move far more between the two kernels than stock does (measured
    # at 1536 tokens: 0.052, stock's 0.0099, compressed against stock 0.053), so the yardstick is
    # capped to stay a tight bound there
    yardstick = mean_kld(reference["logits"], reference_no_fa["logits"])
    assert yardstick > 0
    assert mean_kld(reference["logits"], direct["logits"]) < min(2 * yardstick, 0.02)


def test_direct_attention_costs_no_quality_against_stock(runs):
    stock = runs["stock"]["logits"]
    kld_reference, kld_direct = mean_kld(stock, runs["reference"]["logits"]), mean_kld(stock, runs["direct"]["logits"])
    assert 0 < kld_direct < 1.25 * kld_reference + 0.002


def test_coarsened_blocks_attend_directly_with_fewer_rows(runs):
    # under the budget most blocks lost detail subbands: their dropped rows are skipped, not read as 0
    mixed = runs["mixed-direct"]["stats"]
    assert mixed["coarsenings"] > 0
    assert mixed["compressed_bytes"] < 0.8 * runs["direct"]["stats"]["compressed_bytes"]
    yardstick = mean_kld(runs["reference"]["logits"], runs["reference-no-fa"]["logits"])
    assert mean_kld(runs["mixed-reference"]["logits"], runs["mixed-direct"]["logits"]) < 2 * yardstick


def test_blocks_coarsened_head_by_head_attend_directly(runs):
    # the heads of one block hold different subbands: a dropped head's groups are absent, not its rows
    direct, reference = runs["per-head-direct"], runs["per-head-reference"]
    steps = [h["steps"] for h in direct["heads"]]
    assert min(steps) < max(steps) and direct["stats"]["coarsenings"] > 0
    assert [h["bytes"] for h in direct["heads"]] == [h["bytes"] for h in reference["heads"]]
    yardstick = mean_kld(runs["reference"]["logits"], runs["reference-no-fa"]["logits"])
    assert mean_kld(reference["logits"], direct["logits"]) < 2 * yardstick


def test_direct_attention_gives_the_same_bits_on_any_thread_count(runs):
    # the work is cut into fixed parts, whatever the threads: 1 and 2 threads compute the same sums
    assert np.array_equal(runs["direct"]["logits"], runs["direct-1-thread"]["logits"])


def test_with_guidance_only_the_sampled_decode_steps_leave_the_direct_path(runs):
    # guidance scores the decoded keys of one query position in 64 (p % 64 == 63): that step takes
    # the reference path, every other one attends directly, bit for bit as without guidance
    guided, direct, reference = (runs[r]["logits"] for r in ("guided-direct", "direct", "reference"))
    assert runs["guided-direct"]["stats"]["coarsenings"] == 0
    first_pos = TOKENS - ARGS["logits_last"]
    sampled = [i for i in range(len(guided)) if (first_pos + i) % 64 == 63]
    assert sampled == [len(guided) - 1]  # positions 1488..1535: only 1535
    before = slice(0, sampled[0])
    assert np.array_equal(guided[before], direct[before])
    assert not np.array_equal(direct[before], reference[before])
    assert not np.array_equal(guided[sampled[0]], direct[sampled[0]])


def cache_contents(state: KVState, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the cache holds for one of its layers: positions, K and V in float64, the blocks decoded by
    the numpy codec, then the exact cells."""
    tier, cells = state.tier, state.streams[0]
    assert not any(b.moved.any() for b in tier.blocks)
    positions = np.concatenate([*(b.positions for b in tier.blocks), cells.positions])
    k = np.concatenate([*(decode_block(b.k[layer]) for b in tier.blocks), cells.k[layer].read(state.blob)])
    v = np.concatenate([*(decode_block(b.v[layer]) for b in tier.blocks), cells.v[layer].read(state.blob)])
    kept = positions >= 0  # a removed token's row
    return positions[kept], k[kept].astype(np.float64), v[kept].astype(np.float64)


def exact_attention(before: KVState, after: KVState, layer: int, q: np.ndarray, query_pos: np.ndarray) -> np.ndarray:
    """Causal softmax attention in float64 of a micro-batch's queries q (tokens, heads, head size, as the
    model made them) over the cache before it and its own cells after it; the result (tokens, heads,
    V head size) is in the cache's basis, as the graph's kqv_out."""
    old, new = cache_contents(before, layer), cache_contents(after, layer)
    own = new[0] >= query_pos[0]
    positions, k, v = (np.concatenate([a, b[own]]) for a, b in zip(old, new, strict=True))
    n_q, n_head, dk = q.shape
    if before.tier.basis & 1:  # llama.cpp rotates K per head (attn_rot_k), and q with it
        q = q @ (scipy.linalg.hadamard(dk) / np.sqrt(dk))
    n_head_kv = k.shape[1] // dk
    dv = v.shape[1] // n_head_kv
    out = np.empty((n_q, n_head, dv))
    for t in range(n_q):
        for i in range(n_head):
            h = i // (n_head // n_head_kv)
            scores = k[:, h * dk : (h + 1) * dk] @ q[t, i] / np.sqrt(dk)
            scores[positions > query_pos[t]] = -np.inf
            weights = np.exp(scores - scores.max())
            out[t, i] = weights @ v[:, h * dv : (h + 1) * dv] / weights.sum()
    return out


def attention_errors(
    tmp_path, model: str, tokens: int, batch: int, flash_attn: bool, path: dict, random_kv: int | None = None
) -> dict:
    """Each full-attention layer's output for one micro-batch after `tokens` tokens, on the direct or
    the reference path (`path`), against float64 attention over the same cache (its blocks decoded
    by the numpy codec): {"errors": {layer: max |difference| / max |exact|}, "steps": the blocks',
    "cells": {"k": ..., "v": ...} the exact cells' values after it, all layers}. random_kv: the seed
    of the noise that replaces the model's keys and values (tests/scripts/attention.py)."""
    out = tmp_path / "captured.npz"
    args = {"tokens": tokens, "batch": batch, "model": model, "flash_attn": flash_attn, "out": str(out)}
    if random_kv is not None:
        args["random_kv"] = random_kv
    env = child_env(**ON, **path, **MIXED)
    captured_names = json.loads(run_script("attention", json.dumps(args), env=env).stdout)["captured"]
    captured = np.load(out)
    before, after = (KVState.parse((tmp_path / f"captured.{when}.state").read_bytes()) for when in ("before", "after"))
    layers = sorted(int(n.split("-")[1]) for n in captured_names if re.fullmatch(r"Qcur-\d+", n))
    if model == "gemma3":  # its full-attention layers, one in six (llama.cpp: set_swa_pattern(6))
        layers = [il for il in layers if il % 6 == 5]
    assert len(layers) == len(before.streams[0].k)
    errors = {}
    for j, il in enumerate(layers):
        expected = exact_attention(before, after, j, captured[f"Qcur-{il}"], captured["positions"])
        got = captured[f"kqv_out-{il}"].reshape(expected.shape)
        errors[il] = float(np.abs(got - expected).max() / np.abs(expected).max())
    cells = after.streams[0]
    kept = cells.positions >= 0
    return {
        "errors": errors,
        "steps": sorted({b.step for b in before.tier.blocks}),
        "cells": {
            "k": np.stack([r.read(after.blob)[kept] for r in cells.k]),
            "v": np.stack([r.read(after.blob)[kept] for r in cells.v]),
        },
    }


# model, tokens before the micro-batch, its size, flash attention
SHAPES = [
    ("smollm2", 1536, 1, True),
    ("smollm2", 3072, 1, False),  # V transposed in the exact cells
    ("smollm2", 3072, 16, True),  # a micro-batch: its queries see each other causally
    ("gemma3", 1536, 1, True),
    ("gemma3", 3072, 16, False),
]


def check_exact_attention(tmp_path, model: str, tokens: int, batch: int, flash_attn: bool, **kwargs) -> dict:
    """The direct path's output against float64 attention over the decoded blocks, under the MIXED budget."""
    # The direct path reads the coefficients, never the decoded values, so agreement to float
    # rounding checks its algebra. (The reference path's f16 kernels miss by 1e-3 to 3e-2:
    # scripts/measure_attention_error.py.)
    measured = attention_errors(tmp_path, model, tokens, batch, flash_attn, DIRECT, **kwargs)
    assert len(measured["steps"]) >= 2  # blocks of mixed levels
    worst = max(measured["errors"], key=measured["errors"].get)
    assert measured["errors"][worst] < 1e-5, f"layer {worst}: relative error {measured['errors'][worst]:.2e}"
    return measured


@pytest.mark.parametrize("model,tokens,batch,flash_attn", SHAPES)
def test_direct_attention_is_exact_attention_over_the_decoded_blocks(tmp_path, model, tokens, batch, flash_attn):
    check_exact_attention(tmp_path, model, tokens, batch, flash_attn)


@pytest.mark.parametrize(
    "model,tokens,batch,flash_attn",
    [("smollm2", 3072, 16, True), ("smollm2", 1536, 1, False), ("gemma3", 1536, 1, True)],
)
def test_direct_attention_is_exact_attention_over_random_blocks(tmp_path, model, tokens, batch, flash_attn):
    # blocks with no structure from a model: every key and value the graph made is N(0, 1) noise
    measured = check_exact_attention(tmp_path, model, tokens, batch, flash_attn, random_kv=0)
    for role, values in measured["cells"].items():
        # the cache holds the noise: f16-rounded, in llama.cpp's Hadamard basis (which keeps N(0, 1))
        assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01, (role, values.mean(), values.std())
