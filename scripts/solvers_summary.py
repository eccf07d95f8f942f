"""One line from `pipeline bench solvers` output (its last JSON line), for scripts/gpu-check.sh:
`ok|bad <figure>`, where bad means a row is not finite or the CUDA-graph row strays from the eager
sequential one by 1e-4 or more. Speeds are sequential time / row time (higher is faster)."""
import json
import math
import sys

doc = None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("{"):
        doc = json.loads(line)
if doc is None:
    sys.exit("no JSON line in " + sys.argv[1])
rows = doc["solvers"]
seq = rows[0]
ok = True
parts = []
for row in rows[1:]:
    label = row["solver"]
    speed = seq["seconds"] / row["seconds"] if row["seconds"] > 0 else float("nan")
    err = row["max_abs_diff_vs_sequential"]
    ok &= math.isfinite(err) and math.isfinite(speed)
    if "CUDA" in label:
        ok &= err < 1e-4
        name = "graph steps"
    elif label.startswith("jacobi"):
        name = "jacobi" + (" tol " + label.split("tol ")[1].split(")")[0].split(",")[0] if "tol" in label else "")
    else:
        name = label.split(" (")[0]
    parts.append(f"{name} {speed:.2f}x depth {row['depth']} |d| {err:.0e}")
print(("ok " if ok else "bad ")
      + f"sequential {seq['seconds']:.2f} s depth {seq['depth']}; " + ", ".join(parts))
