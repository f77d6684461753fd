"""KV-cache codecs: the wavelet block codec and the baselines it is measured against (numpy reference).

Every codec takes one layer's K or V as float32 (n_tokens, n_heads, head_dim), with values exactly
representable in f16, and returns the decoded array of the same shape plus the exact size in bytes
the compressed form takes. One codec per module: identity, eviction, ggml_quant (Q8_0, Q4_0), kivi,
pooling, haar (`HaarCodec`). The Haar codec's bytes are specified in docs/FORMAT.md and implemented
in haar_format.py; the C implementation must match `HaarCodec.encode_block` and `decode_block` bit for bit.

Names: `CODECS` maps registry names to configurations; `parse_codec` also accepts parametrised specs
such as ``haar:levels=4,bits=8.6.5.4.3,hadamard=1,group=64,threshold=0.5``.
"""

from __future__ import annotations

from kvggml.codecs.base import Codec
from kvggml.codecs.eviction import Eviction
from kvggml.codecs.ggml_quant import Q4_0, Q8_0
from kvggml.codecs.haar import HaarCodec
from kvggml.codecs.haar_format import coarsen_block, decode_block
from kvggml.codecs.hadamard import hadamard_rotate
from kvggml.codecs.identity import Identity
from kvggml.codecs.keys_values import KeysValues
from kvggml.codecs.kivi import Kivi
from kvggml.codecs.per_layer import PerLayer
from kvggml.codecs.pooling import Pooling
from kvggml.presets import PRESETS, preset_bits

__all__ = [
    "Codec",
    "HaarCodec",
    "Identity",
    "KeysValues",
    "PerLayer",
    "Eviction",
    "Q8_0",
    "Q4_0",
    "Kivi",
    "Pooling",
    "coarsen_block",
    "decode_block",
    "hadamard_rotate",
    "parse_codec",
    "CODECS",
    "PRESETS",
    "preset_bits",
]

CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Identity(),
        Q8_0(name="q8_0"),
        Q4_0(name="q4_0"),
        Q8_0(hadamard=True, name="q8_0+hadamard"),
        Q4_0(hadamard=True, name="q4_0+hadamard"),
        Kivi(bits=4, name="kivi4"),
        Kivi(bits=2, name="kivi2"),
        Pooling(levels=1, name="pool2"),
        Pooling(levels=2, name="pool4"),
        Eviction(),
        HaarCodec(bits=preset_bits("fine", 4), name="haar-fine"),
        HaarCodec(bits=preset_bits("hi", 4), name="haar-hi"),
        HaarCodec(name="haar"),
        HaarCodec(bits=preset_bits("lo", 4), name="haar-lo"),
        HaarCodec(hadamard=False, name="haar-noH"),
        HaarCodec(bits=(16,) * 5, group=32, name="haar-16"),
    )
}

_KINDS: dict[str, type[Codec]] = {cls.KIND: cls for cls in (Identity, Eviction, Q8_0, Q4_0, Kivi, Pooling, HaarCodec)}


def parse_codec(spec: str) -> Codec:
    """A registry name (see CODECS) or `kind:field=value,...`, e.g. `haar:levels=4,bits=8.6.5.4.3,group=64`;
    `K|V` gives keys and values codecs of their own: `haar-hi|haar-lo`; `BASE@LAYERS=CODEC...` gives
    model layers codecs of their own: `haar-lo@5,11=haar-hi`, inside K|V: `haar-lo@5,11=haar-hi|haar-lo`."""
    spec = spec.strip()
    if "|" in spec:  # K's codec, then V's
        keys, _, values = spec.partition("|")
        return KeysValues(parse_codec(keys), parse_codec(values))
    if "@" in spec:  # a codec for the other layers, then LAYERS=CODEC for each set apart
        base, *parts = spec.split("@")
        return PerLayer(parse_codec(base), tuple(parse_layers(spec, part) for part in parts))
    if spec in CODECS:
        return CODECS[spec]
    kind, _, params = spec.partition(":")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(
            f"unknown codec {spec!r}: expected a name ({', '.join(CODECS)}) "
            f"or kind:field=value,... with kind one of {', '.join(_KINDS)}"
        )
    kwargs: dict[str, object] = {}
    for item in filter(None, params.split(",")):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or key not in cls.SPEC_FIELDS:
            allowed = ", ".join(cls.SPEC_FIELDS) or "no fields"
            raise ValueError(f"{spec!r}: unknown field {key!r}: {kind} takes {allowed}")
        if key in kwargs:
            raise ValueError(f"{spec!r}: field {key!r} given twice")
        try:
            kwargs[key] = cls.SPEC_FIELDS[key](raw)
        except ValueError as err:
            raise ValueError(f"{spec!r}: {key}={raw!r} is not valid ({err})") from None
    return cls(**kwargs)


def parse_layers(spec: str, part: str) -> tuple[tuple[int, ...], Codec]:
    """One `LAYERS=CODEC` of a per-layer spec: model layer numbers from 0, separated by commas."""
    layers, equals, codec = part.partition("=")
    numbers = tuple(int(n) for n in layers.split(",") if n.strip().isdigit())
    if not equals or not numbers or len(numbers) != len(layers.split(",")):
        raise ValueError(
            f"{spec!r}: {part!r} is not LAYERS=CODEC with LAYERS model layer numbers from 0 separated by commas "
            "(e.g. 5,11=haar-hi)"
        )
    return numbers, parse_codec(codec)
