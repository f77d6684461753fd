#!/usr/bin/env python3
"""Pinned llama.cpp: fetch, patch, build, and export patches back.

    vendor.py fetch           download the pinned sdist with pip, check sha256, extract;
                              prints the sdist's path
    vendor.py apply-patches   vendor/llama.cpp = pinned source + patches/*.patch (a git checkout)
    vendor.py format-patches  write the commits of vendor/llama.cpp back to patches/
    vendor.py build [stock|patched|sanitize|fuzz|tsan ...]
                              build libllama, llama-perplexity and llama-bench, and llama-server
                              for patched (default: stock, patched)
    vendor.py options VARIANT the CMake options `build` configures VARIANT with, one a line
                              (scripts/speed_on_another_cpu.sh builds with them elsewhere)

Layout (all git-ignored):
    build/cache/<sdist>        the verified download
    build/llama.cpp-stock/     pristine source, never edited
    vendor/llama.cpp/          git checkout: tag kvggml-base = pristine, branch kvggml = patched
    build/<variant>/bin
                               shared libraries and tools of each variant

Only the standard library is used, so this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "vendor" / "llama-cpp-python.toml"
BUILD = Path(os.environ.get("KVGGML_BUILD_DIR", REPO / "build"))
CACHE = BUILD / "cache"
STOCK_SRC = BUILD / "llama.cpp-stock"
PATCHED_SRC = Path(os.environ.get("KVGGML_PATCHED_SRC", REPO / "vendor" / "llama.cpp"))
PATCHES = Path(os.environ.get("KVGGML_PATCHES_DIR", REPO / "patches"))
KVGGML_CSRC = REPO / "kvggml" / "csrc"
BASE_TAG = "kvggml-base"
BRANCH = "kvggml"
# Records which source and which patch series a tree holds, so a rerun with nothing changed does nothing.
SOURCE_STAMP = ".kvggml-source"
SERIES_STAMP = "kvggml-series"  # inside .git of the patched checkout
# Records the options and compilers a build tree was configured with: any change reconfigures it.
CONFIGURE_STAMP = ".kvggml-configure"

X86 = platform.machine().lower() in ("x86_64", "amd64")
NO_AMX_FLAGS = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
TARGETS = ["llama", "llama-perplexity", "llama-bench"]
CMAKE_OPTIONS = [
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DGGML_RPC=ON",  # llama.cpp's backend for layers on other machines (ggml-rpc-server), tested with compression
]
# What each build adds. `sanitize` is the patched tree with AddressSanitizer and UBSan on libllama
# (kvggml's code and llama.cpp's KV cache); ggml stays unsanitized, so tests keep their speed.
# `fuzz` is `sanitize` with kvggml's sources calling __sanitizer_cov_trace_pc on every edge, which
# the fuzz driver (tests/fuzz) defines: only libllama is built, as tools could not link it.
# `tsan` is ThreadSanitizer on the whole tree, ggml's thread pool included (no OpenMP: its runtime
# is not instrumented, so its barriers would look like races).
SANITIZE = [f"-DKVGGML_SOURCE_DIR={KVGGML_CSRC}", "-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON"]
VARIANT_OPTIONS = {
    "stock": [],
    "patched": [f"-DKVGGML_SOURCE_DIR={KVGGML_CSRC}", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF"],
    "sanitize": SANITIZE,
    "fuzz": [*SANITIZE, "-DKVGGML_COMPILE_OPTIONS=-fsanitize-coverage=trace-pc"],
    "tsan": [f"-DKVGGML_SOURCE_DIR={KVGGML_CSRC}", "-DLLAMA_SANITIZE_THREAD=ON", "-DGGML_OPENMP=OFF"],
}
# Compiler flags a build adds to the whole tree, ggml included.
VARIANT_FLAGS = {"tsan": ["-fsanitize=thread"]}
# The patched build adds llama.cpp's own server, which honours OLLAMA_KV_COMPRESSION like every tool,
# and its RPC server, which serves a model's layers to another machine's llama.cpp.
VARIANT_TARGETS = {"patched": [*TARGETS, "llama-server", "ggml-rpc-server"], "fuzz": ["llama"]}
# KVGGML_CMAKE_OPTIONS adds options to both builds alike (stock stays comparable), e.g. "-DGGML_NATIVE=OFF".
EXTRA_CMAKE_OPTIONS = shlex.split(os.environ.get("KVGGML_CMAKE_OPTIONS", ""))
GIT_IDENTITY = ["-c", "user.name=kvggml", "-c", "user.email=kvggml@localhost", "-c", "commit.gpgsign=false"]


class VendorError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[vendor] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, quiet: bool = False) -> str:
    # Output not captured goes to stderr: stdout carries only what `fetch` prints.
    res = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE if quiet else sys.stderr,
        stderr=subprocess.STDOUT if quiet else None,
    )
    if res.returncode != 0:
        detail = f"\n{res.stdout}" if quiet and res.stdout else ""
        raise VendorError(f"command failed ({res.returncode}): {' '.join(cmd)}{detail}")
    return res.stdout or ""


def git(*args: str, cwd: Path = PATCHED_SRC, quiet: bool = True) -> str:
    return run(["git", *GIT_IDENTITY, *args], cwd=cwd, quiet=quiet)


def read_lock() -> dict:
    sdist = tomllib.loads(LOCK.read_text())["sdist"]
    for key in ("package", "version", "filename", "sha256"):
        if key not in sdist:
            raise VendorError(f"{LOCK}: [sdist] lacks '{key}'")
    return sdist


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist in build/cache, downloaded by pip on first use, always hash-checked."""
    lock = read_lock()
    path = CACHE / lock["filename"]
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"downloading {lock['package']}=={lock['version']} (sdist) with pip")
        # --no-binary for this package only: its build dependencies may still come as wheels.
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                lock["package"],
                "--dest",
                str(CACHE),
                f"{lock['package']}=={lock['version']}",
            ],
            quiet=True,
        )
    digest = sha256_of(path)
    if digest != lock["sha256"]:
        path.unlink()
        raise VendorError(
            f"{path.name}: sha256 {digest} does not match the lock ({lock['sha256']}); "
            "the file was removed, run again to download it afresh"
        )
    return path


def extract_llama_cpp(sdist: Path, dest: Path, digest: str) -> bool:
    """Extract the sdist's vendor/llama.cpp into dest; False when dest already holds it."""
    stamp = dest / SOURCE_STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        return False
    if dest.exists():
        shutil.rmtree(dest)
    log(f"extracting llama.cpp into {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp, tarfile.open(sdist) as tar:
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise VendorError(f"{sdist.name} has no {prefix}")
        tar.extractall(tmp, members=members, filter="data")
        src = Path(tmp) / prefix
        (src / ".git").unlink(missing_ok=True)  # a submodule pointer into the sdist's own .git
        shutil.move(src, dest)
    stamp.write_text(digest + "\n")
    return True


def cmd_fetch() -> None:
    sdist = fetch_sdist()
    digest = read_lock()["sha256"]
    BUILD.mkdir(parents=True, exist_ok=True)
    extract_llama_cpp(sdist, STOCK_SRC, digest)
    log(f"pinned source ok: {sdist.name} sha256 {digest[:16]}…")
    print(sdist)  # for `pip install "$(vendor.py fetch)"`


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def series_digest() -> str:
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cmd_apply_patches() -> None:
    sdist = fetch_sdist()
    digest = read_lock()["sha256"]
    BUILD.mkdir(parents=True, exist_ok=True)
    if extract_llama_cpp(sdist, PATCHED_SRC, digest):
        git("init", "-q", "-b", BRANCH)
        git("add", "-A")
        git("commit", "-q", "-m", f"llama.cpp from llama-cpp-python {read_lock()['version']}")
        git("tag", BASE_TAG)
    stamp = PATCHED_SRC / ".git" / SERIES_STAMP
    want = series_digest()
    head = git("rev-parse", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        raise VendorError(
            f"{PATCHED_SRC} has uncommitted changes: commit them and run "
            f"`make format-patches`, or discard them (git -C {PATCHED_SRC} checkout .)"
        )
    if stamp.exists():
        recorded_series, recorded_head = stamp.read_text().split()
        if recorded_series == want and recorded_head == head:
            log(f"patches up to date ({len(patch_files())} applied)")
            return
        if recorded_head != head:
            raise VendorError(
                f"{PATCHED_SRC} has commits that are not in {PATCHES}: "
                "run `make format-patches` to keep them, or "
                f"`git -C {PATCHED_SRC} reset --hard {BASE_TAG}` to drop them"
            )
    elif head != git("rev-parse", BASE_TAG).strip():
        raise VendorError(
            f"{PATCHED_SRC} holds an unrecorded series (did a patch fail to apply?): finish it and run "
            f"`make format-patches`, or start over with `git -C {PATCHED_SRC} reset --hard {BASE_TAG}`"
        )
    stamp.unlink(missing_ok=True)
    git("checkout", "-q", "-B", BRANCH, BASE_TAG)
    for patch in patch_files():
        try:
            git("am", "-q", "-3", "--committer-date-is-author-date", str(patch))
        except VendorError as err:
            git("am", "--abort")
            raise VendorError(
                f"patch {patch.name} does not apply to llama.cpp {read_lock()['version']}; "
                f"{PATCHED_SRC} holds the patches before it. To fix it:\n"
                f"  1. git -C {PATCHED_SRC} am -3 {patch}\n"
                "  2. resolve the conflicts, git add, git am --continue\n"
                "  3. apply the remaining patches the same way, then `make format-patches`\n"
                f"{err}"
            ) from None
        log(f"applied {patch.name}")
    stamp.write_text(f"{want} {git('rev-parse', 'HEAD').strip()}\n")


def cmd_format_patches() -> None:
    if not (PATCHED_SRC / ".git").exists():
        raise VendorError("vendor/llama.cpp is not a checkout yet: run `make apply-patches` first")
    if git("status", "--porcelain", "--untracked-files=no").strip():
        raise VendorError("vendor/llama.cpp has uncommitted changes: commit them first")
    for old in patch_files():
        old.unlink()
    # Stable bytes: no commit ids, numbers, signature or diffstat that would change on every export.
    git(
        "format-patch",
        "-q",
        "--zero-commit",
        "--no-numbered",
        "--no-signature",
        "--no-stat",
        "--output-directory",
        str(PATCHES),
        f"{BASE_TAG}..HEAD",
    )
    (PATCHED_SRC / ".git" / SERIES_STAMP).write_text(f"{series_digest()} {git('rev-parse', 'HEAD').strip()}\n")
    for p in patch_files():
        log(f"wrote patches/{p.name}")


def compiler_identity(env: dict) -> dict:
    """Each compiler CMake will pick (CC/CXX or the default), by resolved path and version."""
    identity = {}
    for var, default in (("CC", "cc"), ("CXX", "c++")):
        name = env.get(var, default).split()[0]
        path = shutil.which(name, path=env.get("PATH"))
        version = (
            subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1] if path else []
        )
        identity[var] = {"path": str(Path(path).resolve()) if path else name, "version": version[0] if version else ""}
    return identity


def configure(src: Path, out: Path, options: list[str], env: dict) -> bool:
    """Configure out from src unless it already was with these options and compilers; True when it ran.

    A changed identity starts from an empty cache: CMake keeps cached values that the new options
    no longer set, and a compiler can only be chosen on a tree's first configure.
    """
    identity = json.dumps(
        {"source": str(src), "options": options, "compilers": compiler_identity(env)}, indent=1, sort_keys=True
    )
    stamp = out / CONFIGURE_STAMP
    if (out / "CMakeCache.txt").exists() and stamp.exists() and stamp.read_text() == identity:
        return False
    if (out / "CMakeCache.txt").exists():
        log(f"build options or compilers of {out.name} changed: reconfiguring")
    stamp.unlink(missing_ok=True)
    (out / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(out / "CMakeFiles", ignore_errors=True)
    log(f"configuring {out.name}")
    run(["cmake", "-S", str(src), "-B", str(out), *options], env=env, quiet=True)
    stamp.write_text(identity)
    return True


def cmake_options(variant: str) -> list[str]:
    """The CMake options a variant's tree is configured with."""
    # No AMX kernels in either tree: on AMX CPUs (Sapphire Rapids and later) ggml's AMX matmul
    # crashes stock and patched alike (llama.cpp #20824). Explicit -mno-* flags win over
    # -march=native whatever their order, in GCC and Clang. x86 only: other compilers do not know them.
    flags = " ".join([*(NO_AMX_FLAGS if X86 else []), *VARIANT_FLAGS.get(variant, [])])
    compiler_flags = [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"] if flags else []
    return [*CMAKE_OPTIONS, *compiler_flags, *EXTRA_CMAKE_OPTIONS, *VARIANT_OPTIONS[variant]]


def build_variant(variant: str, jobs: int) -> None:
    src = STOCK_SRC if variant == "stock" else PATCHED_SRC
    out = BUILD / variant
    options = cmake_options(variant)
    env = dict(os.environ)
    if shutil.which("ccache"):
        # Paths relative to the repo in the ccache key: a fresh clone (CI) reuses this machine's objects.
        env.setdefault("CCACHE_BASEDIR", str(REPO))
        env.setdefault("CCACHE_NOHASHDIR", "true")
    configure(src, out, options, env)
    targets = VARIANT_TARGETS.get(variant, TARGETS)
    log(f"building {variant}: {', '.join(targets)}")
    run(["cmake", "--build", str(out), "--parallel", str(jobs), "--target", *targets], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch")
    sub.add_parser("apply-patches")
    sub.add_parser("format-patches")
    build = sub.add_parser("build")
    build.add_argument("variants", nargs="*", metavar="|".join(VARIANT_OPTIONS), help="default: stock and patched")
    build.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    options = sub.add_parser("options")
    options.add_argument("variant", choices=list(VARIANT_OPTIONS))
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            cmd_fetch()
        elif args.command == "apply-patches":
            cmd_apply_patches()
        elif args.command == "format-patches":
            cmd_format_patches()
        elif args.command == "options":
            print("\n".join(cmake_options(args.variant)))
        else:
            args.variants = args.variants or ["stock", "patched"]
            for variant in set(args.variants) - set(VARIANT_OPTIONS):
                parser.error(f"build: unknown variant {variant!r}: expected one of {', '.join(VARIANT_OPTIONS)}")
            if "stock" in args.variants:
                cmd_fetch()
            if set(args.variants) - {"stock"}:
                cmd_apply_patches()
            for variant in args.variants:
                build_variant(variant, args.jobs)
    except VendorError as err:
        print(f"vendor.py {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
