#!/usr/bin/env python3
"""Checks a moeforge TensorBoard log against its JSONL log with independent readers.

Used by tests/launch/test_metrics.cpp. Two checks, both must pass:
  1. The event file's TFRecord framing is re-parsed by hand, and every record's length CRC and
     data CRC is checked with the `crc32c` package (not moeforge's CRC, not TensorBoard's).
  2. TensorBoard's own reader (EventAccumulator, what `tensorboard --logdir` uses for scalars)
     loads the log directory; its scalars must equal the JSONL log exactly: same tags, same
     steps in the same order, same wall times, and value == float32(JSON value) (a JSON null
     stands for a non-finite value, which TensorBoard must then hold).
Exits 1 with a message naming the first mismatch; prints a one-line summary on success.

Needs the PyPI packages `tensorboard` and `crc32c`.
"""
import argparse
import json
import math
import os
import struct
import sys

import crc32c
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2


def fail(message):
    print(f"tb_readback: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def to_float32(x):
    """Round to nearest float32; beyond its range that is +-inf, as in the C++ writer."""
    with np.errstate(over="ignore"):
        return np.float32(x)


def masked_crc(data):
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    """TFRecord framing: u64 length | u32 masked crc(length) | data | u32 masked crc(data), LE."""
    blob = open(path, "rb").read()
    records, offset = [], 0
    while offset < len(blob):
        if offset + 12 > len(blob):
            fail(f"{path}: truncated record header at byte {offset}")
        header = blob[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[offset + 8:offset + 12])
        if length_crc != masked_crc(header):
            fail(f"{path}: record {len(records)} at byte {offset}: length CRC {length_crc:#010x}, "
                 f"expected {masked_crc(header):#010x}")
        start = offset + 12
        if start + length + 4 > len(blob):
            fail(f"{path}: record {len(records)} at byte {offset}: length {length} runs past the end")
        data = blob[start:start + length]
        (data_crc,) = struct.unpack("<I", blob[start + length:start + length + 4])
        if data_crc != masked_crc(data):
            fail(f"{path}: record {len(records)} at byte {offset}: data CRC {data_crc:#010x}, "
                 f"expected {masked_crc(data):#010x}")
        records.append(data)
        offset = start + length + 4
    return records


def read_jsonl(path):
    """tag -> [(step, wall_time, value or None)] in file order."""
    expected = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: not JSON: {e}")
            step, wall_time = record.pop("step"), record.pop("wall_time")
            for tag, value in record.items():
                expected.setdefault(tag, []).append((step, wall_time, value))
    return expected


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, help="TensorBoard log directory (one event file)")
    parser.add_argument("--jsonl", required=True, help="the JSONL log of the same run")
    parser.add_argument("--expect-scalars", type=int, required=True,
                        help="number of scalars the writer wrote (guards against two empty logs agreeing)")
    args = parser.parse_args()

    event_files = [f for f in sorted(os.listdir(args.logdir)) if "tfevents" in f]
    if len(event_files) != 1:
        fail(f"{args.logdir}: expected one tfevents file, found {event_files}")
    event_path = os.path.join(args.logdir, event_files[0])

    expected = read_jsonl(args.jsonl)
    n_expected = sum(len(v) for v in expected.values())
    if n_expected != args.expect_scalars:
        fail(f"{args.jsonl}: {n_expected} scalars, the writer wrote {args.expect_scalars}")

    # 1. Framing and CRCs with an independent CRC32C first: a bad record is named here, where
    # TensorBoard's reader would only drop it. The record count ties the two checks.
    records = read_records(event_path)
    first = event_pb2.Event.FromString(records[0])
    if first.file_version != "brain.Event:2":
        fail(f"{event_path}: first record is not file_version brain.Event:2: {first}")
    if len(records) != 1 + n_expected:
        fail(f"{event_path}: {len(records)} records, expected 1 + {n_expected}")

    # 2. TensorBoard's reader against JSONL.
    acc = event_accumulator.EventAccumulator(args.logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    if acc.file_version != 2.0:
        fail(f"{event_path}: file_version {acc.file_version}, expected 2 (brain.Event:2)")
    tb_tags = sorted(acc.Tags()[event_accumulator.SCALARS])
    if tb_tags != sorted(expected):
        fail(f"tags differ: TensorBoard {tb_tags}, JSONL {sorted(expected)}")
    for tag in tb_tags:
        got, want = acc.Scalars(tag), expected[tag]
        if len(got) != len(want):
            fail(f"tag {tag}: TensorBoard has {len(got)} scalars, JSONL {len(want)}")
        for i, (g, (step, wall_time, value)) in enumerate(zip(got, want)):
            where = f"tag {tag} #{i} (step {step})"
            if g.step != step:
                fail(f"{where}: TensorBoard step {g.step}")
            if g.wall_time != wall_time:
                fail(f"{where}: TensorBoard wall_time {g.wall_time!r}, JSONL {wall_time!r}")
            if value is None:
                if math.isfinite(g.value):
                    fail(f"{where}: JSONL null (non-finite) but TensorBoard {g.value!r}")
            elif np.float32(g.value) != to_float32(value):
                fail(f"{where}: TensorBoard {g.value!r} != float32(JSONL {value!r}) = {float(to_float32(value))!r}")

    print(f"tb_readback: OK: {event_files[0]}: {len(records)} records with valid CRCs, "
          f"{len(tb_tags)} tags, {n_expected} scalars equal to JSONL")


if __name__ == "__main__":
    main()
