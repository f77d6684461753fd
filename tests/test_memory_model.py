"""Model-based tests of llama.cpp's memory operations with compression on (issue 13).

tests/scripts/memory_model.py draws random operations (decode, seq_rm anywhere, seq_cp,
seq_keep, seq_add, seq_div, whole and per-sequence state save and restore, 1-4 sequences),
applies them to a compressed and an exact context and to a model of each cache, and checks
after every operation positions, segments, bitmaps and step maps, and at probes the next-token
logits against tolerances from reading. The suite runs a few seeds of moderate length;
`make memory-model` runs many more. A failure found is shrunk to a short operation list and
kept below (REGRESSIONS).
"""

from __future__ import annotations

import json

import pytest
from conftest import last_json, run_script

SEEDS, OPS = "0-1", 100
OPERATIONS = {"decode", "probe", "rm", "cp", "keep", "add", "div", "save", "restore", "save_seq", "restore_seq"}
N_SEQ_MAX = 4
ASSERTED = ("reading", "window lost")  # the regimes whose probes have a tolerance (memory_model.REGIMES)

# Shrunk failing cases, replayed as they were found: [operation, arguments...] (memory_model.py's format).
REGRESSIONS = {
    # seq_cp of a sequence onto itself copied its compressed blocks, so each of their tokens was held twice
    # (llama.cpp's cells do nothing there); the logits barely moved (KLD 0.002), the segments showed it
    "seq_cp-onto-itself": [["decode", 0, 63081, 88], ["cp", 0, 0, -1, -1]],
}


def memory_model(*args: str, timeout: float = 600) -> tuple[dict, int]:
    res = run_script("memory_model", *args, timeout=timeout, check=False)
    assert res.stdout.strip(), res.stderr[-3000:]
    return last_json(res), res.returncode


@pytest.mark.parametrize("variant", ["preset", "hierarchy", "drop"])
def test_random_operations_keep_both_caches_as_the_model_says(variant):
    report, rc = memory_model("--variant", variant, "--seeds", SEEDS, "--ops", str(OPS))
    assert report["failures"] == [] and rc == 0
    # every kind of operation ran, and after each one every sequence was checked
    assert set(report["per_op"]) == OPERATIONS
    n = report["operations"]
    assert n >= 0.9 * 2 * OPS
    assert report["checks"]["positions"] == report["checks"]["segments"] == report["checks"]["bitmaps"] == N_SEQ_MAX * n
    assert sum(report["probes"].values()) == report["per_op"]["probe"]
    assert report["checks"]["logits"] == sum(report["probes"][r] for r in ASSERTED) and report["probes"]["reading"] > 0
    for regime in ASSERTED:
        assert report["max_kld"][regime] <= report["tolerance"][regime]
    # the states that matter were reached: blocks cut by a removal, copied, moved and restored, and
    # cells shared by sequences (which stay exact); with a schedule, coarsened blocks, and with "drop"
    # blocks without their finest subband
    seen = report["seen"]
    assert min(seen["cut blocks"], seen["copied blocks"], seen["moved blocks"], seen["shared cells"]) > 0
    assert seen["restored blocks"] > 0
    assert (seen["coarsened blocks"] > 0) == (variant != "preset")
    assert (seen["dropped subbands"] > 0) == (variant == "drop")


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_shrunk_failures_stay_fixed(name):
    report, rc = memory_model("--replay", json.dumps(REGRESSIONS[name]))
    assert report["failures"] == [] and rc == 0
    assert report["operations"] == len(REGRESSIONS[name])  # none skipped: the case still means what it did


def test_a_context_that_reads_wrong_values_fails_the_logits_check_and_shrinks():
    # the compressed context reads every decode backwards: positions and blocks are right, the values not
    report, rc = memory_model("--fault", "reverse", "--seeds", "0", "--ops", "40")
    assert rc == 1
    (failure,) = report["failures"]
    assert failure["check"] == "logits" and failure["op"][0] == "probe"
    assert failure["kld"] > report["tolerance"][failure["regime"]]
    # shrunk to a decode of a few tokens and the probe that sees them
    shrunk = failure["shrunk"]
    assert [op[0] for op in shrunk] == ["decode", "probe"] and shrunk[0][3] > 1
    replayed, rc = memory_model("--fault", "reverse", "--replay", json.dumps(shrunk))
    assert rc == 1 and replayed["failures"][0]["check"] == "logits"
