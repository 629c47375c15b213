"""The ONNX export on a benchmark folder, one row per method: export time and size, the largest score
difference from Loupe in ONNX Runtime and OpenVINO, image AUROC from each runtime beside Loupe's, and images/s
at batch 1 and 8 (2 threads) beside `loupe eval`'s.

    python3 scripts/onnx_benchmark.py --data ../shared/datasets/mtd --methods padim,patchcore [--out out/onnx]

The test images are first copied losslessly to PNG (OUT/png, decoded once by PIL): a JPEG decoded by PIL's
libjpeg-turbo and by Loupe's image-rs differs by a grey level here and there, which is not the model's doing
(`--jpeg` feeds the original files instead, to measure that effect).

Fits each method with its defaults (or reuses OUT/METHOD.safetensors), exports it, scores the test images with
`loupe infer --json` and `loupe eval --json`, then runs the exported file over the same images (maps are
written by `loupe infer --maps` and compared as the parity test does: largest difference over the map's range).
Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from onnx_parity import OnnxRuntime, OpenVino, load_rgb, map_span  # noqa: E402

LOUPE = os.path.join(os.path.dirname(__file__), "..", "target", "release", "loupe")


def loupe(*args):
    run = subprocess.run([LOUPE, *args], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"loupe {' '.join(args)} failed:\n{run.stderr}")
    return run.stdout


def auroc(scores, labels):
    """Area under the ROC curve by ranks (ties share their average rank)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    positives, negatives = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def lossless_copy(data, out):
    """The benchmark's test images as PNG under `out`, same folders and stems."""
    test = os.path.join(data, "test")
    for folder, _, files in os.walk(test):
        for name in files:
            target = os.path.join(out, os.path.relpath(folder, test), os.path.splitext(name)[0] + ".png")
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                Image.open(os.path.join(folder, name)).save(target)
    return out


def images_per_second(runtime, images, batch):
    timed = images[: max(batch, 16)]
    start = time.perf_counter()
    count = 0
    for image in timed:
        runtime.run(np.repeat(image, batch, axis=0))
        count += batch
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", default="padim,patchcore")
    parser.add_argument("--out", default="out/onnx")
    parser.add_argument("--jpeg", action="store_true", help="feed the original files, decoded by each side")
    parser.add_argument(
        "--timing-only", action="store_true", help="only images/s: Loupe's (eval, batch 1) and each runtime's"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    test_dir = os.path.join(args.data, "test") if args.jpeg else lossless_copy(args.data, os.path.join(args.out, "png"))
    rows = []
    for method in args.methods.split(","):
        model = os.path.join(args.out, f"{method}.safetensors")
        if not os.path.exists(model):
            loupe("fit", "--method", method, "--data", args.data, "--out", model)
        onnx_path = os.path.join(args.out, f"{method}.onnx")
        start = time.perf_counter()
        loupe("export", "--model", model, "--format", "onnx", "--out", onnx_path)
        export_seconds = time.perf_counter() - start
        evaluation = json.loads(loupe("eval", "--model", model, "--data", args.data, "--json"))
        if args.timing_only:
            timed = [load_rgb(os.path.join(folder, name)) for folder, _, names in os.walk(test_dir) for name in names][:16]
            row = {"method": method, "loupe_images_per_s": evaluation["test_images_per_s"]}
            for runtime in (OnnxRuntime(onnx_path), OpenVino(onnx_path)):
                row[runtime.name] = {"batch1": images_per_second(runtime, timed, 1), "batch8": images_per_second(runtime, timed, 8)}
            print(json.dumps(row), flush=True)
            continue
        maps_dir = os.path.join(args.out, "maps", method)
        scored = [
            json.loads(line)
            for line in loupe("infer", "--model", model, "--json", "--maps", maps_dir, test_dir).splitlines()
        ]
        labels = [f"{os.sep}good{os.sep}" not in row["path"] for row in scored]
        images = [load_rgb(row["path"]) for row in scored]
        row = {
            "method": method,
            "export_s": export_seconds,
            "size_mb": os.path.getsize(onnx_path) / 1e6,
            "loupe_eval_auroc": evaluation["image_auroc"],
            "loupe_auroc": auroc([r["score"] for r in scored], labels),
            "loupe_images_per_s": evaluation["test_images_per_s"],
        }
        for runtime in (OnnxRuntime(onnx_path), OpenVino(onnx_path)):
            score_errors, map_errors, verdicts_equal, scores = [], [], 0, []
            for image, expected in zip(images, scored):
                anomaly_map, score, verdict = runtime.run(image)
                size = expected["map_size"]
                loupe_map = np.fromfile(expected["map_file"], dtype="<f4").reshape(size, size)
                scores.append(float(score[0]))
                score_errors.append(abs(scores[-1] - expected["score"]) / max(abs(expected["score"]), 1e-12))
                span = map_span(loupe_map)
                map_errors.append(float(np.abs(anomaly_map[0] - loupe_map).max()) / span)
                verdicts_equal += {0: "pass", 1: "review", 2: "reject"}[int(verdict[0])] == expected["verdict"]
            row[runtime.name] = {
                "max_score_error": max(score_errors),
                "max_map_error_of_range": max(map_errors),
                "auroc": auroc(scores, labels),
                "verdicts_equal": verdicts_equal / len(images),
                "batch1": images_per_second(runtime, images, 1),
                "batch8": images_per_second(runtime, images, 8),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| method | export | file | AUROC Loupe / ORT / OpenVINO | max score rel. error ORT / OV "
        "| max map error (of range) ORT / OV | verdicts equal ORT / OV | img/s Loupe (eval, b1) "
        "| img/s ORT b1 / b8 | img/s OpenVINO b1 / b8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ort, ov = r["onnxruntime"], r["openvino"]
        print(
            f"| {r['method']} | {r['export_s']:.2f} s | {r['size_mb']:.1f} MB "
            f"| {r['loupe_auroc']:.5f} / {ort['auroc']:.5f} / {ov['auroc']:.5f} "
            f"| {ort['max_score_error']:.1e} / {ov['max_score_error']:.1e} "
            f"| {ort['max_map_error_of_range']:.1e} / {ov['max_map_error_of_range']:.1e} "
            f"| {100 * ort['verdicts_equal']:.0f} % / {100 * ov['verdicts_equal']:.0f} % "
            f"| {r['loupe_images_per_s'] or 0:.1f} | {ort['batch1']:.1f} / {ort['batch8']:.1f} "
            f"| {ov['batch1']:.1f} / {ov['batch8']:.1f} |"
        )

if __name__ == "__main__":
    main()
