"""The Ray batch path (scripts/ray_batch.py) against `loupe infer`, with 1 and then 2 workers on a local cluster.

    python3 scripts/ray_check.py --model M.safetensors --images DIR [--workers 1,2] [--out out/ray]

Exports M to ONNX, scores every image under DIR with `loupe infer --json` and with the Ray path at each worker
count, and checks: the same files, identical verdicts, scores within the ONNX parity bound (relative 1e-4).
JPEG files are first copied losslessly to PNG (PIL's and Loupe's JPEG decoders differ by a grey level here and
there, which is not the model's doing; `--jpeg` keeps them). Prints one JSON line per worker count with the
throughput (cluster start excluded) and exits 1 when the results differ.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ray_batch import image_files, score_archive  # noqa: E402

LOUPE = os.path.join(HERE, "..", "target", "release", "loupe")
SCORE_RELATIVE_ERROR = 1e-4


def lossless_copy(folder, out):
    from PIL import Image

    for path in image_files(folder):
        target = os.path.join(out, os.path.splitext(os.path.relpath(path, folder))[0] + ".png")
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Image.open(path).save(target)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default="out/ray")
    parser.add_argument("--loupe", default=LOUPE)
    parser.add_argument("--jpeg", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    images = args.images if args.jpeg else lossless_copy(args.images, os.path.join(args.out, "png"))
    onnx_path = os.path.join(args.out, "model.onnx")
    subprocess.run([args.loupe, "export", "--model", args.model, "--format", "onnx", "--out", onnx_path], check=True,
                   stdout=subprocess.DEVNULL)
    infer = subprocess.run([args.loupe, "infer", "--model", args.model, "--json", images], capture_output=True, text=True)
    if infer.returncode not in (0, 3):  # 3: some image was unreadable, reported per line
        sys.exit(f"loupe infer failed:\n{infer.stderr}")
    expected = {os.path.abspath(row["path"]): row for row in map(json.loads, infer.stdout.splitlines())}
    # Files Loupe could not read are reported on stderr ("skipped PATH: reason"): Ray's path says "unreadable".
    for line in infer.stderr.splitlines():
        if line.startswith("skipped "):
            path = line[len("skipped "):].split(": ")[0]
            expected[os.path.abspath(path)] = {"path": path, "verdict": "unreadable"}
    import ray

    ok = True
    for workers in map(int, args.workers.split(",")):
        rows, seconds = score_archive(onnx_path, images, workers)
        ray.shutdown()
        got = {os.path.abspath(row["path"]): row for row in rows}
        worst = 0.0
        differing = [path for path in expected if path not in got] + [path for path in got if path not in expected]
        for path, row in got.items():
            want = expected.get(path)
            if want is None:
                continue
            if row["verdict"] != want["verdict"]:
                differing.append(path)
            elif want.get("score") is not None:
                worst = max(worst, abs(row["score"] - want["score"]) / max(abs(want["score"]), 1e-12))
        passed = not differing and worst <= SCORE_RELATIVE_ERROR
        ok &= passed
        print(json.dumps({
            "workers": workers,
            "images": len(rows),
            "seconds": round(seconds, 2),
            "images_per_s": round(len(rows) / seconds, 1),
            "max_score_relative_error": worst,
            "differing_files_or_verdicts": differing[:5],
            "passed": passed,
        }), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
