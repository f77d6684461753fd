"""Read a prefix of the default text, then one micro-batch of more tokens, and keep what attention saw
and gave in that micro-batch: each layer's queries (the graph's "Qcur-<layer>", after RoPE) and
attention output ("kqv_out-<layer>", before the output projection), and the sequence's saved state
(its exact cells and compressed blocks) before and after it: the tier compresses after a micro-batch,
so the cache the micro-batch saw is the state before it and its own cells after it. Run by
tests/test_direct_attention.py:
    python tests/scripts/attention.py '{"tokens": 3072, "batch": 1, "model": "gemma3", "flash_attn": true,
                                        "out": "x.npz"}'
writes x.npz (Qcur-<layer> as (tokens, heads, head size), kqv_out-<layer> flat, token after token;
"positions" of the micro-batch's tokens), x.before.state and x.after.state.
Environment: KVGGML_LIB and OLLAMA_KV_COMPRESSION* as the test sets them.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys

import numpy as np

from kvggml.library import choose_library, load_llama_cpp
from kvggml.model import Runner, default_model_path, default_text, gemma3_model_path, silence_llama_logs

CAPTURED = re.compile(r"(Qcur|kqv_out)-\d+")  # the graph's names, without its views' " (reshaped)" ones
GGML_TYPE_F32 = 0


class Tensor(ctypes.Structure):
    """The head of ggml's struct ggml_tensor (ggml.h): type, buffer, ne, nb (ggml has no getter for ne)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def main() -> None:
    args = json.loads(sys.argv[1])
    llama_cpp = load_llama_cpp()
    silence_llama_logs(llama_cpp)
    ggml = ctypes.CDLL(str(choose_library().directory / "libggml-base.so"))
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_get_data.restype = ctypes.c_void_p
    ggml.ggml_get_data.argtypes = [ctypes.c_void_p]
    ggml.ggml_is_contiguous.restype = ctypes.c_bool
    ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]

    capturing = False
    captured: dict[str, np.ndarray] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def on_node(tensor, ask, user_data):
        name = ggml.ggml_get_name(tensor).decode()
        wanted = capturing and CAPTURED.fullmatch(name) is not None
        if ask or not wanted:
            return wanted
        head = Tensor.from_address(tensor)
        if head.type != GGML_TYPE_F32 or not ggml.ggml_is_contiguous(tensor):
            raise SystemExit(f"{name}: not a contiguous f32 tensor")
        ne = list(head.ne)
        data = ctypes.cast(ggml.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
        values = np.ctypeslib.as_array(data, (int(np.prod(ne)),)).copy()
        # Qcur: ne (head size, heads, tokens); kqv_out: the tokens' outputs, token by token
        captured[name] = values.reshape(-1, ne[1], ne[0]) if name.startswith("Qcur") else values
        return True

    model = gemma3_model_path() if args.get("model") == "gemma3" else default_model_path()
    with Runner(
        llama_cpp, model, n_ctx=args.get("n_ctx", 4096), n_threads=2, flash_attn=args["flash_attn"], cb_eval=on_node
    ) as run:
        tokens = run.tokenize(default_text())[: args["tokens"] + args["batch"]]
        run.decode(tokens[: args["tokens"]], 0)
        states = {"before": run.get_state()}
        capturing, run.n_batch = True, args["batch"]
        run.decode(tokens[args["tokens"] :], args["tokens"])
        states["after"] = run.get_state()
    positions = np.arange(args["tokens"], args["tokens"] + args["batch"])
    np.savez(args["out"], positions=positions, **captured)
    for name, state in states.items():
        with open(args["out"].removesuffix(".npz") + f".{name}.state", "wb") as f:
            f.write(state)
    print(json.dumps({"captured": sorted(captured)}))


if __name__ == "__main__":
    main()
