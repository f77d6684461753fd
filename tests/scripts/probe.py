"""Run the default model in a process of its own and report what happened, as JSON.

Tests that need the patched library (the pytest process holds stock llama.cpp) or
their own environment run this file:
    python tests/scripts/probe.py '{"n_ctx": 1024, "tokens": 700, "logits_last": 64, "out": "x.npy"}'
(optional: "repeat": [first, end] appends tokens[first:end] again after the tokens; "tail_batch": the
last logits_last tokens in micro-batches of this many; "threads": ggml threads, 2 unless given;
"model": "gemma3" for Gemma 3 270M instead of the default model; "restore": save the sequence's
state at the end, score a token, load the state back and report whether the token scores the same)
Environment: KVGGML_LIB and OLLAMA_KV_COMPRESSION* as the test sets them.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np

from kvggml.library import load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, gemma3_model_path, silence_llama_logs


def main() -> None:
    args = json.loads(sys.argv[1])
    llama_cpp = load_llama_cpp()
    if not args.get("show_logs"):
        silence_llama_logs(llama_cpp)
    from kvggml import native
    from kvggml.native import stats_or_none

    report: dict = {}
    try:
        run = Runner(
            llama_cpp,
            gemma3_model_path() if args.get("model") == "gemma3" else default_model_path(),
            n_ctx=args["n_ctx"],
            n_batch=args.get("n_batch", 512),
            n_threads=args.get("threads", 2),
            flash_attn=args.get("flash_attn", True),
        )
    except RuntimeError as err:
        print(json.dumps({"error": str(err)}))
        return
    with run:
        events = []
        if args.get("callback"):

            def on_compress(event):
                events.append(event)
                if args["callback"] == "raise" and len(events) == 2:
                    raise RuntimeError("raised by the test's callback")

            callback = native.CompressCallback(run.ctx, on_compress)
        tokens = run.tokenize(default_text())[: args["tokens"]]
        if "repeat" in args:  # a passage read again at the end: what induction heads attend to
            first, end = args["repeat"]
            tokens = np.concatenate([tokens, tokens[first:end]])
        n_logits = args.get("logits_last", 0)
        head = tokens[: len(tokens) - n_logits]
        run.decode(head, 0)
        report["stats_after_prefix"] = stats_or_none(llama_cpp, run.ctx)
        if n_logits:
            run.n_batch = args.get("tail_batch", run.n_batch)
            logits = run.decode(tokens[len(head) :], len(head), want_logits=True)
            np.save(args["out"], logits)
        report["stats"] = stats_or_none(llama_cpp, run.ctx)
        if args.get("callback"):
            report["events"] = events
            report["callback_errors"] = [str(e) for e in callback.errors]
            report["segments"] = native.get_segments(run.ctx, 0)
            report["bitmap"] = native.get_bitmap(run.ctx, 0)
            report["step_map"] = native.get_step_map(run.ctx, 0)
            report["heads"] = native.get_head_reports(run.ctx, 0)
            callback.close()
        if args.get("restore"):  # save the sequence, score one token, load it back, score it again
            saved, n_held = run.get_state(), len(tokens)
            report["restored_state_bytes"] = len(saved)
            first = run.decode(tokens[:1], n_held, want_logits=True)
            run.set_state(saved)
            report["restored_heads"] = native.get_head_reports(run.ctx, 0)
            again = run.decode(tokens[:1], n_held, want_logits=True)
            report["restored_logits_equal"] = bool(np.array_equal(first, again))
        report["n_ctx"] = llama_cpp.llama_n_ctx(run.ctx)
        report["can_shift"] = bool(llama_cpp.llama_memory_can_shift(run.memory))
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


if __name__ == "__main__":
    main()
