#!/usr/bin/env python3
"""Compares two `loupe infer --json` outputs of the same model and images (CPU and a GPU): the largest relative
image-score error and whether every verdict is the same. Prints `ERR | yes/no (n images)`."""
import json
import sys


def read(path):
    rows = {}
    with open(path) as lines:
        for line in lines:
            row = json.loads(line)
            if "score" in row:
                rows[row["path"]] = row
    return rows


cpu, device = read(sys.argv[1]), read(sys.argv[2])
shared = sorted(set(cpu) & set(device))
if not shared:
    print("– | no scores to compare")
    sys.exit(0)
error = max(abs(cpu[p]["score"] - device[p]["score"]) / max(abs(cpu[p]["score"]), 1e-12) for p in shared)
same = all(cpu[p]["verdict"] == device[p]["verdict"] for p in shared)
print(f"{error:.1e} | {'yes' if same else 'NO'} ({len(shared)} images)")
