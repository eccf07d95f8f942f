"""Damaged variants of a torch.save archive for the Rust reader's mutation test.

  mutate_pth.py IN.pth OUT_DIR COUNT SEED

The zip is rewritten with correct CRCs (zipfile computes them), so each mutation reaches the pickle
interpreter or the storage reader instead of stopping at the archive's checksum: byte flips, inserted and
deleted runs, truncation of data.pkl, a storage entry cut short or dropped, and the same state_dict in
pickle protocols 2 and 4. Prints a JSON list of the files with what was done to each.
"""
import io
import json
import pickle
import random
import sys
import zipfile

import torch


def entries(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def write(path, items):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in items:
            z.writestr(name, data)


def main():
    src, out, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    items = entries(src)
    pkl = next(i for i, (n, _) in enumerate(items) if n.endswith("/data.pkl"))
    storages = [i for i, (n, _) in enumerate(items) if "/data/" in n]
    made = []
    state = torch.load(src, map_location="cpu")
    for proto in (2, 4):
        buf = io.BytesIO()
        torch.save(state, buf, pickle_protocol=proto)
        path = f"{out}/proto{proto}.pth"
        open(path, "wb").write(buf.getvalue())
        made.append({"file": path, "what": f"protocol {proto}", "intact": True})
    for k in range(count):
        new = list(items)
        name, data = new[pkl]
        data = bytearray(data)
        kind = rng.choice(["flip", "flip", "insert", "delete", "truncate", "storage_cut", "storage_drop"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "insert":
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        elif kind == "truncate":
            del data[rng.randrange(len(data)) :]
        new[pkl] = (name, bytes(data))
        if kind == "storage_cut":
            i = rng.choice(storages)
            n, d = new[i]
            new[i] = (n, d[: rng.randrange(len(d))])
        elif kind == "storage_drop":
            del new[rng.choice(storages)]
        path = f"{out}/m{k:04d}.pth"
        write(path, new)
        made.append({"file": path, "what": kind, "intact": False})
    print(json.dumps(made))


if __name__ == "__main__":
    main()
