"""llama.cpp's own llama-server, built from the patched tree, with compression and parallel slots.

The server runs as a user starts it: `-np 4` (split caches, llama-server's default; compression
keeps them in one store), memory fitting on. Concurrent requests are compared with the same
requests alone, against the same comparison with compression off, since batching changes
rounding in stock llama.cpp too.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import child_env
from servers import free_port, request, running

from kvggml import native
from kvggml.kvstate import TIER_MAGIC
from kvggml.library import library_dir
from kvggml.model import default_model_path, default_text

SLOTS, N_CTX, THRESHOLD = 4, 8192, 64  # 2048 tokens a slot, the window well inside each prompt
KVGT = TIER_MAGIC.to_bytes(4, "little")  # the saved state's kvggml section starts with it


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{compress: base URL} of two running llama-servers, compression on and off, and the folder
    the compressed one saves slots to."""
    slots_dir = tmp_path_factory.mktemp("slots")
    exe = library_dir("patched") / "llama-server"
    urls = {}
    with running_server(exe, True, slots_dir, tmp_path_factory) as on:
        urls[True] = on
        with running_server(exe, False, slots_dir, tmp_path_factory) as off:
            urls[False] = off
            yield urls, slots_dir


def running_server(exe, compress: bool, slots_dir, tmp_path_factory):
    """A llama-server with /metrics on; its log is in the folder slots_dir's parent names "log-on"/"log-off"."""
    port = free_port()
    cmd = [str(exe), "-m", str(default_model_path()), "-c", str(N_CTX), "-np", str(SLOTS), "-t", "2",
           "--port", str(port), "--slot-save-path", str(slots_dir), "--metrics"]  # fmt: skip
    env = child_env(OLLAMA_KV_COMPRESSION="1" if compress else "0", OLLAMA_KV_COMPRESSION_THRESHOLD=str(THRESHOLD))
    log = slots_dir.parent / f"llama-server-{'on' if compress else 'off'}.txt"
    return running(cmd, env, log, "/health", port)


def metrics(url: str) -> dict[str, float]:
    """llama-server's /metrics as {name: value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        return native.parse_metrics(response.read().decode())


def first_token_logprobs(url: str, prompts: list[str], at_once: bool) -> list[dict[str, float]]:
    """For each prompt, read from scratch: the log-probabilities of the 10 likeliest next tokens."""

    def post(prompt: str) -> dict[str, float]:
        body = {"prompt": prompt, "n_predict": 1, "n_probs": 10, "temperature": 0, "cache_prompt": False}
        reply = request(f"{url}/completion", body)
        assert reply["tokens_evaluated"] > THRESHOLD + 4 + 16  # past the window by more than a block
        return {p["token"]: p["logprob"] for p in reply["completion_probabilities"][0]["top_logprobs"]}

    if not at_once:
        return [post(prompt) for prompt in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(post, prompts))


def divergence(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest log-probability difference of a token both have among their likeliest."""
    return max(abs(a[token] - b[token]) for token in a.keys() & b.keys())


def test_four_concurrent_requests_diverge_from_each_alone_no_more_than_batching_and_compression(servers):
    """Four requests at once, each in its own slot, against the same requests one at a time.

    Batching changes rounding: stock llama.cpp's next-token log-probabilities move by up to ~0.25
    here between the two. Quantization can turn such a change into a step of the grid, so the
    compressed server's own divergence is bounded by stock's plus what compression itself costs
    (compressed against exact, alone). Another sequence's tokens leaking into a slot, or a slot's
    blocks misplaced, would move them by whole units.
    """
    urls, _ = servers
    text = default_text()
    prompts = [text[i * 3000 : i * 3000 + 1800] for i in range(SLOTS)]
    d_batch, d_compress = {True: [], False: []}, []
    for _ in range(2):  # batching differs from run to run: two rounds
        alone = {compress: first_token_logprobs(url, prompts, at_once=False) for compress, url in urls.items()}
        for compress, url in urls.items():
            together = first_token_logprobs(url, prompts, at_once=True)
            d_batch[compress] += [divergence(a, t) for a, t in zip(alone[compress], together, strict=True)]
        d_compress += [divergence(c, e) for c, e in zip(alone[True], alone[False], strict=True)]
    print(f"concurrent against alone: compressed {d_batch[True]}, exact {d_batch[False]}; "
          f"compressed against exact, alone: {d_compress}")  # fmt: skip
    assert max(d_batch[True]) <= max(d_batch[False]) + max(d_compress)


def completion(url: str, prompt: str, **options) -> dict:
    body = {"prompt": prompt, "id_slot": 0, "cache_prompt": True, "temperature": 0, **options}
    return request(f"{url}/completion", body)


def test_a_saved_and_restored_slot_continues_with_identical_probabilities(servers):
    urls, slots_dir = servers
    url, text = urls[True], default_text()
    prompt, more = text[:3000], text[3000:3400]
    first = completion(url, prompt, n_predict=1)
    assert first["tokens_evaluated"] > THRESHOLD + 4 + 16  # compressed blocks in the slot
    saved = request(f"{url}/slots/0?action=save", {"filename": "slot0.bin"})
    assert saved["n_saved"] > 0
    assert KVGT in (slots_dir / "slot0.bin").read_bytes()  # the compressed blocks travel in the file

    before = completion(url, prompt + more, n_predict=8, n_probs=5)
    request(f"{url}/slots/0?action=erase", {})
    restored = request(f"{url}/slots/0?action=restore", {"filename": "slot0.bin"})
    assert restored["n_restored"] == saved["n_saved"]
    after = completion(url, prompt + more, n_predict=8, n_probs=5)
    assert after["tokens_cached"] == before["tokens_cached"]  # the same tokens came from the restored slot
    assert after["completion_probabilities"] == before["completion_probabilities"]


def test_a_corrupted_slot_file_is_refused_and_the_server_keeps_serving(servers):
    urls, slots_dir = servers
    url = urls[True]
    completion(url, default_text()[:3000], n_predict=1)
    request(f"{url}/slots/0?action=save", {"filename": "good.bin"})
    data = bytearray((slots_dir / "good.bin").read_bytes())
    data[data.index(KVGT) + 4096] ^= 0x40  # a byte inside the compressed blocks
    (slots_dir / "bad.bin").write_bytes(bytes(data))

    with pytest.raises(urllib.error.HTTPError) as refused:
        request(f"{url}/slots/0?action=restore", {"filename": "bad.bin"})
    assert refused.value.code in (400, 500)
    assert request(f"{url}/health")["status"] == "ok"
    reply = completion(url, "The capital of France is", n_predict=4)
    assert reply["content"].strip()


def test_metrics_and_the_slot_log_show_what_each_slot_holds_compressed(servers):
    urls, slots_dir = servers
    url = urls[True]
    log = slots_dir.parent / "llama-server-on.txt"
    logged_before = len(slot_log_lines(log, 2))
    reply = completion(url, default_text()[6000:8000], n_predict=4, id_slot=2, cache_prompt=False)
    held = metrics(url)
    tokens = held['kvggml:seq_compressed_tokens{seq="2"}']
    # the slot's prompt and answer, but its newest THRESHOLD tokens and the sinks, in whole blocks of 16
    n_tokens = reply["tokens_evaluated"] + reply["tokens_predicted"] - 1
    assert tokens == (n_tokens - THRESHOLD - 4) // 16 * 16
    per_slot = [held[f'kvggml:seq_compressed_tokens{{seq="{seq}"}}'] for seq in range(SLOTS)]
    assert sum(per_slot) == held["kvggml:compressed_tokens"]
    assert held["kvggml:enabled"] == 1 and held["kvggml:compression_ratio"] > 3
    assert held["llamacpp:prompt_tokens_total"] > 0  # llama-server's own metrics are all still there
    # the slot's timings in the log are followed by the same count; llama.cpp's logger writes from
    # its own thread, so the line may land after the reply
    deadline = time.monotonic() + 30
    while len(lines := slot_log_lines(log, 2)) == logged_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(lines) == logged_before + 1, "this request's timings were not logged with kvggml's count"
    assert f"kvggml: seq 2: {int(tokens)} tokens compressed in {int(tokens) // 16} blocks" in lines[-1]
    # compression off: kvggml says so, and the log has no such line
    assert metrics(urls[False])["kvggml:enabled"] == 0
    assert "kvggml: seq" not in (slots_dir.parent / "llama-server-off.txt").read_text()


def slot_log_lines(log, seq: int) -> list[str]:
    """The lines of a llama-server log that give kvggml's count for one sequence."""
    return [line for line in log.read_text().splitlines() if f"kvggml: seq {seq}:" in line]


def test_a_bad_variable_stops_llama_server_with_its_reason():
    exe = library_dir("patched") / "llama-server"
    res = subprocess.run(
        [str(exe), "-m", str(default_model_path()), "--port", str(free_port())],
        env=child_env(OLLAMA_KV_COMPRESSION="1", OLLAMA_KV_COMPRESSION_LEVEL="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    reason = "kvggml: error: OLLAMA_KV_COMPRESSION_LEVEL='0' is out of range: expected an integer from 1 to 6"
    assert reason in res.stderr
