"""`kvggml tune`: each raise changes one layer's K or V, the choice keeps to its allowance, and the
setting it prints is the one it checked."""

from __future__ import annotations

import json

import pytest
from conftest import child_env, run_cli

from kvggml.config import CompressionConfig
from kvggml.plan import KVShape, block_bytes
from kvggml.tune import Raise, candidates, choose, raised, tune

SMALL = dict(n_prefill=384, n_score=96, window=128, sinks=4, n_threads=2)
BLOCKS = (384 - 4 - 128) // 16  # whole blocks between the sinks and the window


@pytest.mark.fast
def test_a_raise_sets_one_role_of_one_layer_and_keeps_the_others_own():
    config = CompressionConfig(preset="lo", layers=((5, "balanced"), (7, "fine/lo")))
    tuned = raised(config, [Raise(3, "k"), Raise(5, "v"), Raise(7, "v"), Raise(3, "v")], "hi")
    assert tuned.layers == ((3, "hi"), (5, "balanced/hi"), (7, "fine/hi"))
    assert tuned.preset == "lo" and config.layers == ((5, "balanced"), (7, "fine/lo"))


@pytest.mark.fast
def test_candidates_leave_out_what_is_already_at_the_finer_preset():
    config = CompressionConfig(preset="lo", layers=((2, "hi/lo"), (3, "fine/balanced")))
    assert candidates(config, [1, 2, 3], "hi") == [Raise(1, "k"), Raise(1, "v"), Raise(2, "v"), Raise(3, "v")]
    assert candidates(config, [2, 3], "balanced") == [Raise(2, "v")]


@pytest.mark.fast
def test_the_choice_buys_most_per_byte_within_the_allowance_and_above_the_noise():
    base = dict(kld_mean=0.1)
    raise_of = lambda layer, gain, extra: dict(layer=layer, role="k", gain=gain, extra_bytes=extra)  # noqa: E731
    per_raise = [raise_of(0, 0.02, 100), raise_of(1, 0.03, 300), raise_of(2, 0.004, 1), raise_of(3, 0.01, 50)]
    # gain per byte: layer 3 0.0002, layer 0 0.0002, layer 1 0.0001; layer 2 is below 5 % of the KLD
    assert [r["layer"] for r in choose(base, per_raise, allowance=160, min_gain=0.05)] == [0, 3]
    assert [r["layer"] for r in choose(base, per_raise, allowance=450, min_gain=0.05)] == [0, 3, 1]
    assert [r["layer"] for r in choose(base, per_raise, allowance=449, min_gain=0.05)] == [0, 3]
    assert choose(base, per_raise, allowance=10, min_gain=0.05) == []
    assert [r["layer"] for r in choose(base, per_raise, allowance=10, min_gain=0.01)] == [2]
    # a raise that added KLD shows the noise: gains no larger than it are not taken
    noisy = [*per_raise, raise_of(4, -0.01, 50)]
    assert [r["layer"] for r in choose(base, noisy, allowance=450, min_gain=0.0)] == [0, 1]


@pytest.mark.fast
def test_nothing_to_raise_and_guidance_are_refused_before_anything_runs():
    fine = CompressionConfig(preset="hi", layers=((3, "fine"),))
    with pytest.raises(ValueError, match="every K and V of layers 2, 3 is at hi or finer: nothing to raise"):
        tune(None, None, "never read", fine, [2, 3], up="hi")
    guided = CompressionConfig(guidance=True)
    with pytest.raises(ValueError, match="GUIDANCE=1 is not modelled offline: kvggml tune needs 0"):
        tune(None, None, "never read", guided, [2, 3])


@pytest.fixture(scope="module")
def report(llama_cpp, model_path, text):
    config = CompressionConfig(enabled=True, preset="lo", layers=((18, "hi/lo"),), threshold=128)
    return tune(llama_cpp, model_path, text, config, [3, 18], up="hi", extra=0.01, min_gain=0.0, **SMALL)


def test_each_raise_stores_one_layer_role_at_the_finer_preset(report, model_path):
    """The bytes a raise adds are one layer's K or V blocks at hi instead of lo, no more: the raise
    touched that layer and role alone. Layer 18's K is at hi already, so it is not tried."""
    assert [(r["layer"], r["role"]) for r in report["per_raise"]] == [(3, "k"), (3, "v"), (18, "v")]
    channels = KVShape.from_gguf(model_path).k_widths[3]  # every layer's K and V alike on SmolLM2
    hi, lo = (block_bytes(CompressionConfig(preset=p), channels, "k", 3) for p in ("hi", "lo"))
    assert all(r["extra_bytes"] == BLOCKS * (hi - lo) for r in report["per_raise"])
    assert all(r["gain"] == pytest.approx(report["base"]["kld_mean"] - r["kld_mean"]) for r in report["per_raise"])


def test_the_printed_setting_is_the_one_checked_on_unseen_text(report):
    chosen = [Raise(c["layer"], c["role"]) for c in report["chosen"]]
    expected = choose(report["base"], report["per_raise"], round(0.01 * report["base"]["kv_bytes"]), 0.0)
    assert chosen == [Raise(r["layer"], r["role"]) for r in expected]
    assert chosen, "layer 3 at hi takes a quarter of this policy's KLD off, far above the noise"
    spent = sum(r["extra_bytes"] for r in expected)
    assert spent <= 0.01 * report["base"]["kv_bytes"]
    check = report["check"]
    assert check["skip"] == 384 + 96
    assert check["tuned"]["kv_bytes"] - check["policy"]["kv_bytes"] == spent
    best = max(report["per_raise"], key=lambda r: r["gain"])
    assert check["best_raise_row"]["kv_bytes"] - check["policy"]["kv_bytes"] == best["extra_bytes"]
    assert check["tuned"]["kld_mean"] < check["policy"]["kld_mean"]  # it carries over to unseen text
    assert check["policy"]["kld_mean"] != report["base"]["kld_mean"]  # another part of the text
    env = {"OLLAMA_KV_COMPRESSION_PRESET": "lo", "OLLAMA_KV_COMPRESSION_LAYERS": report["layers_setting"]}
    layers = dict(CompressionConfig.from_env(env).layers)
    for r in chosen:
        assert layers[r.layer].split("/")[0 if r.role == "k" else -1] == "hi"


def test_cli_prints_the_setting_and_writes_table_json_and_plot(tmp_path):
    env = child_env("stock", OLLAMA_KV_COMPRESSION_PRESET="lo", OLLAMA_KV_COMPRESSION_THRESHOLD="128")
    out = run_cli(
        *("tune", "-n", "384", "-m", "96", "--layers", "18", "--min-gain", "0", "--threads", "2"),
        *("--out", str(tmp_path)),
        env=env,
    )
    assert out.returncode == 0, out.stderr
    stem = tmp_path / "tune-SmolLM2-135M-Instruct.Q4_1-N384"
    report = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert f'OLLAMA_KV_COMPRESSION_LAYERS="{report["layers_setting"]}"' in out.stdout
    assert report["layers_setting"].startswith("18=")
    assert stem.with_name(stem.name + ".png").stat().st_size > 0
    assert "| layer | role | KLD |" in stem.with_name(stem.name + ".md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--layers", "3,30"), "--layers 30: compression does not apply to that layer: allowed this model's"),
        (("--layers", "3,x"), "'3,x' is not a comma-separated list of layer numbers"),
        (("--extra", "2"), "'2' is not a fraction from 0 to 1"),
        (("--up", "max"), "invalid choice: 'max'"),
    ],
)
def test_cli_names_a_bad_argument(args, message):
    out = run_cli("tune", *args, env=child_env("stock"))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_cli_refuses_guidance_it_cannot_model():
    out = run_cli("tune", env=child_env("stock", OLLAMA_KV_COMPRESSION_GUIDANCE="1"))
    assert out.returncode != 0 and "GUIDANCE=1 is not modelled offline: kvggml tune needs 0" in out.stderr
