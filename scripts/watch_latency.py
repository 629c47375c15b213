"""End-to-end latency of `loupe watch`: from an image written into the watched folder to its result line on disk.

    python3 scripts/watch_latency.py --model out/onnx/padim.safetensors --data ../shared/datasets/mtd [--count 200]

Drops the benchmark's test images one at a time into a fresh inbox as a camera does (written under a hidden
name, then renamed into place), `--interval` seconds apart, while `loupe watch --sort-into` runs; then reads
`latency_ms` (file written → line on disk) and `scoring_ms` from the results log. Prints p50/p99 and, with
`--interval 0` (a burst), the throughput.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

LOUPE = os.path.join(os.path.dirname(__file__), "..", "target", "release", "loupe")


def quantile(values, q):
    values = sorted(values)
    return values[max(0, min(len(values) - 1, int(round(q * len(values) + 0.5)) - 1))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="an MVTec-layout folder: its test images are dropped")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between two images")
    args = parser.parse_args()
    images = sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(args.data, "test")) for name in names
    )[: args.count]
    work = tempfile.mkdtemp(prefix="loupe-watch-latency-")
    inbox, log = os.path.join(work, "inbox"), os.path.join(work, "state", "results.jsonl")
    os.makedirs(inbox)
    watch = subprocess.Popen(
        [LOUPE, "watch", "--model", args.model, "--input", inbox, "--state-dir", os.path.join(work, "state"),
         "--sort-into", os.path.join(work, "sorted")],
        stderr=subprocess.PIPE, text=True,
    )
    while "watching" not in watch.stderr.readline():
        pass
    # Keep reading what it reports, so a full pipe never stalls it.
    threading.Thread(target=lambda: [None for _ in watch.stderr], daemon=True).start()
    start = time.perf_counter()
    for index, image in enumerate(images):
        name = f"{index:05d}_{os.path.basename(image)}"
        hidden = os.path.join(inbox, "." + name)
        shutil.copyfile(image, hidden)
        os.rename(hidden, os.path.join(inbox, name))
        if args.interval:
            time.sleep(args.interval)
    while not os.path.exists(log) or sum(1 for _ in open(log)) < len(images):
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    watch.terminate()
    watch.wait()
    results = [json.loads(line) for line in open(log)]
    latency = [r["latency_ms"] for r in results]
    scoring = [r["scoring_ms"] for r in results]
    print(json.dumps({
        "model": os.path.basename(args.model),
        "images": len(results),
        "interval_s": args.interval,
        "latency_ms_p50": round(quantile(latency, 0.5), 1),
        "latency_ms_p99": round(quantile(latency, 0.99), 1),
        "scoring_ms_p50": round(quantile(scoring, 0.5), 1),
        "images_per_s": round(len(results) / elapsed, 1),
        "unreadable": sum(r["verdict"] == "unreadable" for r in results),
    }))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
