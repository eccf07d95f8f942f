"""Reads webdataset shards with the reference `webdataset` package and prints one JSON line per sample:
key, raw label text, and what Pillow makes of the image bytes. Used by tests/demo_data.rs."""
import io
import json
import sys

import webdataset as wds
from PIL import Image


def describe(image_bytes):
    info = {}
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            info.update(format=im.format, mode=im.mode, width=im.width, height=im.height,
                        progressive=bool(im.info.get("progressive") or im.info.get("progression")))
            im.load()  # truncated files fail here, not at open
    except Exception as e:  # noqa: BLE001 - the test checks that broken members are broken
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def main():
    dataset = wds.WebDataset(sys.argv[1], shardshuffle=False, empty_check=False)
    for sample in dataset:
        cls = sample.get("cls")
        record = {"key": sample["__key__"], "cls": cls.decode("ascii") if cls is not None else None}
        record.update(describe(sample["jpg"]))
        print(json.dumps(record))


if __name__ == "__main__":
    main()
