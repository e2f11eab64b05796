"""Read the history rows of an offline W&B run file (``run-<id>.wandb``), for the tests.

wandb >= 0.2x ships no Python reader for its run files. The format is W&B's LevelDB-style log:
a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each a
7-byte header (crc32 4, length 2, type 1: full / first / middle / last) and its payload; the
payloads, joined, are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a header never straddles blocks: the rest of the block is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


def history(run_file: str | Path) -> list[dict]:
    """Every ``history`` record of the run: ``{"_step": N, key: value, ...}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
