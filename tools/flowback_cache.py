"""Reads a flowback cache shard (`*.fbc`) with only numpy and zstandard.

    from flowback_cache import load_shard
    shard = load_shard("cache/3f2a9c.../imagenet-train-000000.fbc")
    shard["keys"], shard["fields"]["vae_mean"].shape, shard["meta"]

Format: docs/cache-format.md. Run as a script to print a shard as JSON (used by the tests).
"""
import json
import struct
import sys

import numpy as np
import zstandard

MAGIC = b"FBCACHE1"
TRAILER = 8 + 32 + 8
DTYPES = {"u8": np.uint8, "i8": np.int8, "i64": np.int64, "f16": np.float16, "bf16": np.uint16, "f32": np.float32}


def load_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC or data[-8:] != MAGIC:
        raise ValueError(f"{path}: not a flowback cache shard")
    (footer_len,) = struct.unpack("<Q", data[-TRAILER:-TRAILER + 8])
    footer_end = len(data) - TRAILER
    footer = json.loads(data[footer_end - footer_len:footer_end])
    dctx = zstandard.ZstdDecompressor()
    fields = {}
    for i, spec in enumerate(footer["fields"]):
        dtype = np.dtype(DTYPES[spec["dtype"]]).newbyteorder("<")
        parts = []
        for chunk in footer["chunks"]:
            offset, length = chunk["frames"][i]
            raw = dctx.decompress(data[offset:offset + length])
            parts.append(np.frombuffer(raw, dtype=dtype).reshape([chunk["rows"], *spec["shape"]]))
        array = np.concatenate(parts) if parts else np.zeros([0, *spec["shape"]], dtype)
        if spec["dtype"] == "bf16":
            # bfloat16 is the upper half of a float32.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        fields[spec["name"]] = array
    return {"keys": footer["keys"], "fields": fields, "meta": footer["meta"]}


if __name__ == "__main__":
    shard = load_shard(sys.argv[1])
    print(json.dumps({
        "keys": shard["keys"],
        "meta": shard["meta"],
        "fields": {name: {"shape": list(a.shape), "values": a.astype(np.float64).ravel().tolist()}
                   for name, a in shard["fields"].items()},
    }))
