"""`kvggml tune`: which model layers' keys or values earn a finer preset, measured on the model.

Fixed presets do not carry across models: one layer's keys can cost more than all the others
together (SmolLM2's layer 18, README "Layers apart"). For each full-attention layer and each of
K and V, tune raises that one layer's K or V to a finer preset (`up`) inside the user's policy
(OLLAMA_KV_COMPRESSION_*: preset, layers, schedule, budget), and measures offline, as `kvggml
eval`'s `kvggml` row, how much KLD that buys and for how many bytes. It then takes the raises
that buy most per byte, within an allowance of extra bytes, and checks the chosen
OLLAMA_KV_COMPRESSION_LAYERS on the next part of the text, which the choice never saw.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from kvggml.config import SETTINGS, CompressionConfig
from kvggml.evaluate import Row, evaluate
from kvggml.presets import PRESETS, split_preset

ROLES = ("k", "v")


@dataclass(frozen=True)
class Raise:
    """One model layer's K or V at the finer preset, the rest of the policy unchanged."""

    layer: int
    role: str  # "k" or "v"

    @property
    def label(self) -> str:
        return f"layer {self.layer} {self.role.upper()}"


def raised(config: CompressionConfig, raises: list[Raise], up: str) -> CompressionConfig:
    """`config` with each raise's layer and role at preset `up`, as OLLAMA_KV_COMPRESSION_LAYERS items."""
    layers = dict(config.layers)
    for r in raises:
        pair = dict(zip(ROLES, split_preset(layers.get(r.layer, config.preset)), strict=True))
        pair[r.role] = up
        layers[r.layer] = pair["k"] if pair["k"] == pair["v"] else f"{pair['k']}/{pair['v']}"
    return dataclasses.replace(config, layers=tuple(sorted(layers.items())))


def candidates(config: CompressionConfig, layers: list[int], up: str) -> list[Raise]:
    """Every layer's K and V coarser than `up` (PRESETS lists the finest first)."""
    finer = list(PRESETS)
    return [
        Raise(il, role)
        for il in layers
        for role, preset in zip(ROLES, split_preset(config.preset_of(il)), strict=True)
        if finer.index(preset) > finer.index(up)
    ]


def noise_floor(per_raise: list[dict]) -> float:
    """The most KLD any raise added. A finer preset for one layer cannot make the cache worse beyond
    the measurement's noise (any change re-rolls the model's own rounding), so a gain no larger than
    this is not told apart from noise."""
    return max(0.0, *(-r["gain"] for r in per_raise))


def choose(base: dict, per_raise: list[dict], allowance: int, min_gain: float) -> list[dict]:
    """The raises that buy the most KLD per extra byte, while their bytes fit the allowance; a raise
    must take off at least `min_gain` of the base's KLD, and more than the noise floor."""
    floor = noise_floor(per_raise)
    worth = [r for r in per_raise if r["gain"] > floor and r["gain"] >= min_gain * base["kld_mean"]]
    worth.sort(key=lambda r: r["gain"] / max(r["extra_bytes"], 1), reverse=True)
    chosen, spent = [], 0
    for r in worth:
        cost = max(r["extra_bytes"], 0)  # under a budget a raise can cost nothing: others coarsen instead
        if spent + cost <= allowance:
            chosen.append(r)
            spent += cost
    return chosen


def tune(
    llama_cpp,
    model_path: Path,
    text: str,
    config: CompressionConfig,
    layers: list[int],
    up: str = "hi",
    extra: float = 0.1,
    min_gain: float = 0.05,
    **evaluate_args,
) -> dict:
    """Measure every raise of `layers` on the text's first N + M tokens, choose, and check the choice
    on the N + M tokens after them. extra: the allowance, a fraction of the policy's KV bytes."""
    if up not in PRESETS:
        raise ValueError(f"--up {up!r} is not a preset: expected one of {', '.join(PRESETS)}")
    if not 0 <= extra <= 1:
        raise ValueError(f"--extra {extra}: expected a fraction of the KV bytes from 0 to 1")
    if config.guidance:
        raise ValueError(
            "OLLAMA_KV_COMPRESSION_GUIDANCE=1 is not modelled offline: kvggml tune needs 0 "
            "(tune the layers with age order, then turn guidance on)"
        )
    raises = candidates(config, layers, up)
    if not raises:
        raise ValueError(f"every K and V of layers {', '.join(map(str, layers))} is at {up} or finer: nothing to raise")
    rows = [Row("policy", policy=config)] + [Row(r.label, policy=raised(config, [r], up)) for r in raises]
    measured = evaluate(llama_cpp, model_path, text, rows, **evaluate_args)
    base, *results = measured["rows"]
    per_raise = [
        dict(
            layer=r.layer,
            role=r.role,
            kld_mean=res["kld_mean"],
            gain=base["kld_mean"] - res["kld_mean"],
            extra_bytes=res["kv_bytes"] - base["kv_bytes"],
        )
        for r, res in zip(raises, results, strict=True)
    ]
    chosen = choose(base, per_raise, round(extra * base["kv_bytes"]), min_gain)
    tuned = raised(config, [Raise(c["layer"], c["role"]) for c in chosen], up)

    # The check: the policy, the one raise that took most off, and the choice, on text the choice never saw.
    n_ctx = measured["n_prefill"] + measured["n_score"]
    best = max(per_raise, key=lambda r: r["gain"])
    check_rows = [
        Row("policy", policy=config),
        Row("best raise", policy=raised(config, [Raise(best["layer"], best["role"])], up)),
        Row("tuned", policy=tuned),
    ]
    check = evaluate(llama_cpp, model_path, text, check_rows, skip=n_ctx, **evaluate_args)
    return dict(
        model=str(model_path),
        n_prefill=measured["n_prefill"],
        n_score=measured["n_score"],
        up=up,
        extra=extra,
        min_gain=min_gain,
        policy=config.to_env(),
        base=base,
        per_raise=per_raise,
        noise_floor=noise_floor(per_raise),
        chosen=[{k: c[k] for k in ("layer", "role")} for c in chosen],
        layers_setting=tuned.to_env()[SETTINGS["layers"].env],
        predicted_kld=base["kld_mean"] - sum(c["gain"] for c in chosen),
        check=dict(
            skip=n_ctx,
            best_raise={k: best[k] for k in ("layer", "role")},
            **dict(zip(("policy", "best_raise_row", "tuned"), check["rows"], strict=True)),
        ),
    )


def format_report(report: dict) -> str:
    chosen = {(c["layer"], c["role"]) for c in report["chosen"]}
    base = report["base"]
    lines = [
        f"Each row: one layer's K or V at `{report['up']}`, the rest of the policy unchanged "
        f"(N={report['n_prefill']}, M={report['n_score']}; the policy's KLD {base['kld_mean']:.5f}). "
        f"Noise floor, the most KLD a raise added: {report['noise_floor']:.5f}.",
        "",
        "| layer | role | KLD | KLD taken off | extra KV bytes | chosen |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in sorted(report["per_raise"], key=lambda r: r["gain"], reverse=True):
        lines.append(
            f"| {r['layer']} | {r['role'].upper()} | {r['kld_mean']:.5f} | {r['gain']:+.5f} | "
            f"{r['extra_bytes']:+,} | {'yes' if (r['layer'], r['role']) in chosen else ''} |"
        )
    check = report["check"]
    lines += [
        "",
        f"Checked on the text's next {report['n_prefill'] + report['n_score']} tokens, which the choice never saw:",
        "",
        "| setting | KLD | KV bytes at N |",
        "|---|---:|---:|",
        f"| the policy | {check['policy']['kld_mean']:.5f} | {check['policy']['kv_bytes']:,} |",
        f"| the best raise alone (layer {check['best_raise']['layer']} {check['best_raise']['role'].upper()}) | "
        f"{check['best_raise_row']['kld_mean']:.5f} | {check['best_raise_row']['kv_bytes']:,} |",
        f"| tuned | {check['tuned']['kld_mean']:.5f} | {check['tuned']['kv_bytes']:,} |",
        "",
        f"Predicted from the raises alone: {report['predicted_kld']:.5f} (on the measured part).",
        "",
        f'{SETTINGS["layers"].env}="{report["layers_setting"]}"'
        if report["layers_setting"]
        else "No raise took enough KLD off within the allowance: the policy stays as it is.",
    ]
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(format_report(report) + "\n")
    plot_per_layer(
        report["per_raise"],
        "gain",
        f"KLD taken off by {report['up']} (linear)",
        f"{Path(report['model']).name}, N={report['n_prefill']}: one layer's K or V at {report['up']}",
        paths[2],
        log=False,
    )
    return paths


def plot_per_layer(per_layer: list[dict], key: str, ylabel: str, title: str, path: Path, log: bool) -> None:
    """Bars of `key` per model layer, K's beside V's (rows with "layer", "role" and `key`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in per_layer})
    x = {il: i for i, il in enumerate(layers)}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4), dpi=120)
    for role, dx, color in (("k", -0.2, "tab:blue"), ("v", 0.2, "tab:orange")):
        bars = [r for r in per_layer if r["role"] == role]
        ax.bar([x[r["layer"]] + dx for r in bars], [r[key] for r in bars], width=0.4, label=role.upper(), color=color)
    ax.set_xticks(range(len(layers)), [str(il) for il in layers])
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("model layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
