"""Pillow `Image.resize` on raw RGB inputs, for stages/tests/pillow_parity.rs.

Usage: pillow_resize.py DIR. DIR/cases.json lists {"name", "width", "height", "out_width", "out_height",
"filter": "box"|"bilinear"|"bicubic"}; DIR/NAME.in.rgb holds the input; NAME.out.rgb is written.
"""
import json
import os
import sys

import numpy as np
from PIL import Image

FILTERS = {"box": Image.BOX, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def main():
    root = sys.argv[1]
    with open(os.path.join(root, "cases.json")) as f:
        cases = json.load(f)
    for case in cases:
        raw = np.fromfile(os.path.join(root, case["name"] + ".in.rgb"), dtype=np.uint8)
        image = Image.fromarray(raw.reshape(case["height"], case["width"], 3))
        out = image.resize((case["out_width"], case["out_height"]), FILTERS[case["filter"]])
        np.array(out).tofile(os.path.join(root, case["name"] + ".out.rgb"))


if __name__ == "__main__":
    main()
