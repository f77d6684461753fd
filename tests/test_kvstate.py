"""The state blob of a real context: parsed, edited and restored exactly."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kvggml.kvstate import TIER_MAGIC, KVState, StateFormatError
from kvggml.model import Runner


@pytest.fixture(scope="module")
def filled(llama_cpp, model_path, text):
    runner = Runner(llama_cpp, model_path, n_ctx=512, n_batch=128, n_threads=2)
    tokens = runner.tokenize(text)[:300]
    runner.decode(tokens[:256], 0)
    yield runner, tokens, runner.get_state()
    runner.close()


def test_layout_matches_the_model(filled, llama_cpp):
    runner, _, blob = filled
    state = KVState.parse(blob)
    assert state.n_parts == 1 and len(state.streams) == 1
    stream = state.streams[0]
    assert np.array_equal(np.sort(stream.positions), np.arange(256))
    n_layer = llama_cpp.llama_model_n_layer(runner.model)
    assert len(stream.k) == len(stream.v) == n_layer
    assert all(r.type_name == "f16" and r.n_cells == 256 and not r.transposed for r in stream.k + stream.v)
    assert stream.k[0].n_embd % llama_cpp.llama_model_n_head_kv(runner.model) == 0


def test_read_write_round_trip_is_byte_exact(filled):
    _, _, blob = filled
    state = KVState.parse(blob)
    for rows in state.streams[0].k + state.streams[0].v:
        rows.write(state.blob, rows.read(state.blob))
    assert state.bytes() == blob


def test_edited_state_changes_the_next_logits_and_restoring_undoes_it(filled):
    runner, tokens, blob = filled
    before = runner.decode(tokens[256:260], 256, want_logits=True)
    state = KVState.parse(blob)
    v0 = state.streams[0].v[0]
    v0.write(state.blob, np.zeros((v0.n_cells, v0.n_embd), np.float32))
    runner.set_state(state.bytes())
    edited = runner.decode(tokens[256:260], 256, want_logits=True)
    runner.set_state(blob)
    after = runner.decode(tokens[256:260], 256, want_logits=True)
    assert not np.allclose(edited, before)
    assert np.array_equal(after, before)


@pytest.mark.parametrize("cut", [3, 100, -1])
def test_truncated_state_is_rejected(filled, cut):
    _, _, blob = filled
    with pytest.raises(StateFormatError, match="truncated state"):
        KVState.parse(blob[:cut])


def test_wrong_magic_is_rejected(filled):
    _, _, blob = filled
    with pytest.raises(StateFormatError, match="not a llama.cpp sequence state"):
        KVState.parse(b"\0\0\0\0" + blob[4:])


def tier_section(version: int = 3, n_blocks: int = 1, head_steps: bytes = b"") -> bytes:
    """A tier section (docs/FORMAT.md, section 9) of one layer: level 1 (2-token blocks), widths 4;
    from version 4 on, with the blocks' per-head steps."""
    header = struct.pack("<8I", TIER_MAGIC, version, 1, 1, 4, 4, 0, n_blocks)
    block = struct.pack("<i2i2iI", 0, 7, 8, 0, 0, 1)
    if version >= 4:
        block += struct.pack("<I", len(head_steps)) + head_steps
    block += struct.pack("<I", 3) + b"KKK" + struct.pack("<I", 2) + b"VV"
    return header + block * n_blocks + bytes(8)  # the checksum: the library checks it, this reader does not


@pytest.mark.fast
def test_a_tier_section_is_read_and_a_bad_one_named():
    head = struct.pack("<Ii", 0xAF143CD8, 0)
    # llama.cpp's own part after the section: one stream with no cells
    state = KVState.parse(head + tier_section() + struct.pack("<2I", 1, 0))
    (block,) = state.tier.blocks
    assert (state.tier.level, state.tier.k_width, list(block.positions), block.step) == (1, 4, [7, 8], 1)
    assert (block.k, block.v, block.head_steps) == ([b"KKK"], [b"VV"], b"")
    (block,) = KVState.parse(head + tier_section(4, head_steps=b"\x01\x00") + struct.pack("<2I", 1, 0)).tier.blocks
    assert (block.step, block.head_steps, block.k) == (1, b"\x01\x00", [b"KKK"])
    with pytest.raises(StateFormatError, match="tier section version 2: this reader knows versions 3, 4"):
        KVState.parse(head + tier_section(version=2))
    with pytest.raises(StateFormatError, match="truncated state: block 1 layer 0 V bytes needs 2 bytes"):
        KVState.parse(head + tier_section(n_blocks=2)[:-9])  # one of the last block's V bytes
