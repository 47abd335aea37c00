"""Read what wandb wrote offline: the records of ``run-<id>.wandb`` files.

wandb >= 0.20 writes these from its Go core and ships no Python reader (the old
``wandb.sdk.internal.datastore`` is gone), but the format is unchanged: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then leveldb's log format (32 KiB blocks of chunks
with a 7-byte header: crc32 of type + data, length, type FULL/FIRST/MIDDLE/LAST), each
whole record a ``wandb.proto.wandb_internal_pb2.Record`` - the file ``wandb sync`` uploads.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every protobuf Record in one .wandb file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb transaction log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's zero trailer
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding: the rest of the block is empty
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    """The history rows of one .wandb file: {key: value} with ``_step`` and the logged keys."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_files(run_dir: Path) -> list[Path]:
    """The .wandb file of every offline process of a run directory, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def run_ids(path: Path) -> set[str]:
    return {r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run"}
