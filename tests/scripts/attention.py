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
With "random_kv": <seed>, every layer's new keys and values ("Kcur-<layer>", "Vcur-<layer>") are
overwritten with N(0, 1) noise (numpy's default_rng(seed)) once computed, in the prefix and in the
micro-batch, before the graph writes them into the cache: its cells and blocks then hold data with
no structure from a model, while the queries stay the model's.
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
# several nodes carry each name (before and after RoPE, a reshape's view): each is overwritten, the
# last is what the cache gets
RANDOMIZED = re.compile(r"(Kcur|Vcur)-\d+")
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
    rng = np.random.default_rng(args["random_kv"]) if "random_kv" in args else None
    randomized: dict[str, int] = {}  # nodes overwritten, by name
    problems: list[str] = []  # an exception cannot leave the callback: kept, raised after the decode

    def values(tensor, name: str) -> np.ndarray:
        """The node's data in place, float32 flat, token after token."""
        head = Tensor.from_address(tensor)
        if head.type != GGML_TYPE_F32 or not ggml.ggml_is_contiguous(tensor):
            raise ValueError(f"{name}: not a contiguous f32 tensor")
        data = ctypes.cast(ggml.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, (int(np.prod(list(head.ne))),))

    @llama_cpp.ggml_backend_sched_eval_callback
    def on_node(tensor, ask, user_data):
        name = ggml.ggml_get_name(tensor).decode()
        capture = capturing and CAPTURED.fullmatch(name) is not None
        randomize = rng is not None and RANDOMIZED.fullmatch(name) is not None
        if ask or not (capture or randomize):
            return capture or randomize
        try:
            data = values(tensor, name)
        except ValueError as e:
            problems.append(str(e))
            return False  # stops the graph
        if randomize:
            data[:] = rng.standard_normal(data.size, dtype=np.float32)
            randomized[name] = randomized.get(name, 0) + 1
        else:
            ne = list(Tensor.from_address(tensor).ne)
            # Qcur: ne (head size, heads, tokens); kqv_out: the tokens' outputs, token by token
            captured[name] = data.reshape(-1, ne[1], ne[0]).copy() if name.startswith("Qcur") else data.copy()
        return True

    def decode(tokens: np.ndarray, start: int) -> None:
        run.decode(tokens, start)
        if problems:
            raise SystemExit(problems[0])

    model = gemma3_model_path() if args.get("model") == "gemma3" else default_model_path()
    with Runner(
        llama_cpp, model, n_ctx=args.get("n_ctx", 4096), n_threads=2, flash_attn=args["flash_attn"], cb_eval=on_node
    ) as run:
        tokens = run.tokenize(default_text())[: args["tokens"] + args["batch"]]
        decode(tokens[: args["tokens"]], 0)
        states = {"before": run.get_state()}
        capturing, run.n_batch = True, args["batch"]
        decode(tokens[args["tokens"] :], args["tokens"])
        states["after"] = run.get_state()
    positions = np.arange(args["tokens"], args["tokens"] + args["batch"])
    np.savez(args["out"], positions=positions, **captured)
    for name, state in states.items():
        with open(args["out"].removesuffix(".npz") + f".{name}.state", "wb") as f:
            f.write(state)
    print(json.dumps({"captured": sorted(captured), "randomized": randomized}))


if __name__ == "__main__":
    main()
