"""The bench's results file: every finished cell, written as soon as it finishes, so a run can resume.

A cell is a measurement of one variant with one set of parameters. Its key also holds its inputs
(the model's path and size, the text's hash, the identity of the libraries it ran on): a later run
reuses a stored cell only when the whole key matches, and a cell measured anew replaces the stored
one with the same measurement, variant and parameters.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvggml import __version__


@dataclass(frozen=True)
class Cell:
    measurement: str
    variant: str
    params: dict

    @property
    def label(self) -> str:
        return f"{self.measurement} | {self.variant} | {', '.join(map(describe, self.params.items()))}"

    def key(self, inputs: dict) -> dict:
        return {"measurement": self.measurement, "variant": self.variant, "params": self.params, "inputs": inputs}


def describe(param: tuple[str, object]) -> str:
    name, value = param
    if isinstance(value, bool):  # memory's fill: only its absence is worth a word
        return name if value else f"no {name}"
    return f"{name} {','.join(map(str, value)) if isinstance(value, list) else value}"


def same_cell(record: dict, key: dict) -> bool:
    return all(record[k] == key[k] for k in ("measurement", "variant", "params"))


class ResultStore:
    def __init__(self, path: Path, command: str, fresh: bool = False):
        self.path = path
        self.command = command
        self.records: list[dict] = json.loads(path.read_text())["cells"] if path.is_file() else []
        # fresh: no stored cell is reused, but each stays in the file until it is measured again
        self.reuse = not fresh
        self.measured: list[dict] = []

    def find(self, key: dict) -> dict | None:
        """The record of a cell with exactly this key (inputs included), stored before or measured now."""
        records = self.records if self.reuse else self.measured
        return next((r for r in records if {k: r[k] for k in key} == key), None)

    def put(self, key: dict, result: dict) -> dict:
        """Store a finished cell and write the file at once."""
        record = {**key, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.records = [r for r in self.records if not same_cell(r, key)] + [record]
        self.measured.append(record)
        self.save()
        return record

    def save(self) -> None:
        """Write a temporary file, then rename it over the results: an interruption leaves the old file
        or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        document = {"kvggml": __version__, "command": self.command, "cells": self.records}
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, self.path)
