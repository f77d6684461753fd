#!/usr/bin/env python3
"""Fuzz kvggml's two decoders of untrusted bytes: the block decoder and the saved-state loader.

    fuzz.py [--seconds 600] [--targets block state] [--out build/fuzz/fuzz.json]
    fuzz.py --replay        run every regression input (tests/fuzz/regressions) once

Builds libllama with AddressSanitizer, UBSan and edge coverage on kvggml's sources
(`vendor.py build fuzz`), links tests/fuzz/driver.cpp with each target (tests/fuzz/fuzz_*.cpp),
replays the regressions, then fuzzes each target for --seconds. Seeds: the golden vectors and
the invalid blocks for `block`; real saved states of the target's context for `state`. The
corpus each run finds is kept in build/fuzz/corpus/<target>, so the next run goes on from it.
A crash leaves its input in build/fuzz/crashes/<target>/; once fixed, it belongs in
tests/fuzz/regressions/<target>/. Prints a table; writes the figures as JSON.
Run with the repo's venv: .venv/bin/python scripts/fuzz.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvggml.library import SANITIZER_OPTIONS, build_dir  # noqa: E402
from kvggml.model import default_model_path  # noqa: E402

FUZZ_SRC = REPO / "tests" / "fuzz"
REGRESSIONS = FUZZ_SRC / "regressions"
VECTORS = REPO / "tests" / "vectors"
TARGETS = ("block", "state")


def sh(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, **kwargs)


def build(out: Path) -> dict[str, Path]:
    """The fuzz build of libllama, and one executable per target, relinked when a source changed."""
    if sh([sys.executable, str(REPO / "scripts" / "vendor.py"), "build", "fuzz"]).returncode != 0:
        raise SystemExit("fuzz.py: building libllama for fuzzing failed (see above)")
    lib = out / "bin"
    include = REPO / "vendor" / "llama.cpp"
    exes = {}
    for target in TARGETS:
        sources = [FUZZ_SRC / "driver.cpp", FUZZ_SRC / f"fuzz_{target}.cpp"]
        exe = exes[target] = lib / f"fuzz-{target}"
        inputs = [*sources, lib / "libllama.so", REPO / "kvggml" / "csrc" / "include" / "kvggml.h"]
        if exe.exists() and all(p.stat().st_mtime < exe.stat().st_mtime for p in inputs):
            continue
        cmd = [
            *os.environ.get("CXX", "c++").split(),
            "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            f"-I{REPO / 'kvggml' / 'csrc' / 'include'}",
            f"-I{include / 'include'}", f"-I{include / 'ggml' / 'include'}",
            *map(str, sources),
            f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}",
            # the driver defines the coverage callback that libllama's kvggml sources call
            "-rdynamic",
            "-o", str(exe),
        ]  # fmt: skip
        if sh(cmd).returncode != 0:
            raise SystemExit(f"fuzz.py: compiling the {target} target failed (see above)")
    return exes


def seed_dirs(target: str, out: Path, env: dict) -> list[Path]:
    """Directories whose files seed the target."""
    seeds = out / "seeds" / target
    if seeds.exists():
        shutil.rmtree(seeds)
    seeds.mkdir(parents=True)
    if target == "block":
        blocks = [*VECTORS.glob("*.bin"), *(VECTORS / "coarsen").glob("*.bin"), *(VECTORS / "invalid").glob("*.bin")]
        for path in blocks:
            if not path.name.endswith((".in.bin", ".out.bin")):
                shutil.copy(path, seeds / f"{path.parent.name}-{path.name}")
    else:
        env["KVGGML_FUZZ_SEEDS"] = str(seeds)  # the target saves its context's states there
    return [seeds, REGRESSIONS / target]


def fuzz(target: str, exe: Path, out: Path, seconds: float, env: dict) -> dict:
    corpus, crashes = out / "corpus" / target, out / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    dirs = seed_dirs(target, out, env)
    before = set(crashes.iterdir())
    res = sh(
        [str(exe), f"-max_total_time={seconds}", f"-artifact_prefix={crashes}/", str(corpus), *map(str, dirs)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    found = sorted(set(crashes.iterdir()) - before)
    if res.returncode != 0 or found:
        return {"target": target, "crashes": max(1, len(found)), "crash_inputs": [str(p) for p in found]}
    return {"target": target, **json.loads(res.stdout.strip().splitlines()[-1])}


def replay(exes: dict[str, Path], env: dict) -> bool:
    ok = True
    for target, exe in exes.items():
        files = sorted((REGRESSIONS / target).glob("*"))
        if files and sh([str(exe), *map(str, files)], env=env).returncode != 0:
            ok = False
        print(f"replayed {len(files)} {target} regression inputs", file=sys.stderr)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600, help="fuzzing time per target (default 600)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--replay", action="store_true", help="only run the regression inputs")
    parser.add_argument("--out", type=Path, help="JSON results (default: build/fuzz/fuzz.json)")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error(f"--seconds {args.seconds}: expected a positive number of seconds")
    out = build_dir() / "fuzz"
    exes = {t: e for t, e in build(out).items() if t in args.targets}
    env = {**os.environ, **SANITIZER_OPTIONS, "KVGGML_FUZZ_MODEL": str(default_model_path())}
    env["UBSAN_OPTIONS"] += f":suppressions={FUZZ_SRC / 'ubsan.supp'}"
    if not replay(exes, env):
        print("fuzz.py: a regression input crashes again", file=sys.stderr)
        return 1
    if args.replay:
        return 0
    results = [fuzz(t, exe, out, args.seconds, env) for t, exe in exes.items()]
    print("\n| target | seconds | executions | edges | corpus (seeds) | crashes |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "execs" in r:
            print(f"| {r['target']} | {r['seconds']:.0f} | {r['execs']} | {r['edges']} | "
                  f"{r['corpus']} ({r['seed_inputs']}) | {r['crashes']} |")  # fmt: skip
        else:
            print(f"| {r['target']} | – | – | – | – | {r['crashes']}: {', '.join(r['crash_inputs'])} |")
    path = args.out or out / "fuzz.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
