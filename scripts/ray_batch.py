"""Scores an archive of images with a model Loupe exported to ONNX, on a Ray cluster (or a local one).

    python3 scripts/ray_batch.py --model M.onnx --images ARCHIVE/ --out results.jsonl [--workers 2] [--address auto]

`ray.data` lists and reads the image files, `map_batches` runs ONNX Runtime on them in a pool of `--workers`
actors (one model session each, one thread each), and the results (path, score, verdict 0 pass / 1 review /
2 reject) are written as JSON lines, in path order. The decision and review thresholds are the tuned ones the
exported file carries. Without `--address` a local cluster of `--workers` CPUs is started; with it, the job
joins an existing cluster (`ray start --head` on one machine, `ray start --address HEAD:6379` on the others).

Images of one size batch together (`--batch-size` frames per call); an image that does not decode is reported
with verdict "unreadable" and no score, as `loupe infer` does, and the run goes on.
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VERDICTS = {0: "pass", 1: "review", 2: "reject"}


class OnnxScorer:
    """One ONNX Runtime session per Ray actor."""

    def __init__(self, model_path, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch):
        from PIL import Image

        paths, frames, broken = [], [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            try:
                frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8))
                paths.append(path)
            except Exception as error:  # noqa: BLE001 — any undecodable file is reported, not fatal
                broken.append((path, f"{type(error).__name__}: {error}"))
        out = {"path": [], "score": [], "verdict": [], "error": []}
        # One call per frame size (a batch of the exported graph has one size).
        by_size = {}
        for path, frame in zip(paths, frames):
            by_size.setdefault(frame.shape, []).append((path, frame))
        for group in by_size.values():
            _, scores, verdicts = self.session.run(None, {"image": np.stack([frame for _, frame in group])})
            for (path, _), score, verdict in zip(group, scores, verdicts):
                out["path"].append(path)
                out["score"].append(float(score))
                out["verdict"].append(VERDICTS[int(verdict)])
                out["error"].append("")
        for path, error in broken:
            out["path"].append(path)
            out["score"].append(float("nan"))
            out["verdict"].append("unreadable")
            out["error"].append(error)
        return {key: np.array(values, dtype=object) for key, values in out.items()}


def image_files(folder):
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )


def score_archive(model, folder, workers, batch_size=8, address=None):
    """Rows (path, score, verdict, error) for every image under `folder`, in path order, and the seconds the
    scoring took (cluster start excluded)."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # One CPU per scoring actor, plus one for the tasks that read the files (else they wait forever
            # behind the actors holding every CPU).
            ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    files = image_files(folder)
    if not files:
        sys.exit(f"{folder}: no images")
    started = time.perf_counter()
    dataset = ray.data.read_binary_files(files, include_paths=True)
    scored = dataset.map_batches(
        OnnxScorer,
        fn_constructor_args=(os.path.abspath(model), 1),
        batch_size=batch_size,
        concurrency=workers,
        num_cpus=1,
    )
    rows = sorted(scored.take_all(), key=lambda row: row["path"])
    return rows, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an ONNX file from `loupe export --format onnx`")
    parser.add_argument("--images", required=True, help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, help="JSON lines: path, score, verdict")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_args()
    rows, seconds = score_archive(args.model, args.images, args.workers, args.batch_size, args.address)
    temporary = args.out + ".partial"
    with open(temporary, "w") as out:
        for row in rows:
            line = {"path": row["path"], "verdict": row["verdict"]}
            if row["verdict"] == "unreadable":
                line["error"] = row["error"]
            else:
                line["score"] = row["score"]
            out.write(json.dumps(line) + "\n")
    os.replace(temporary, args.out)
    unreadable = sum(row["verdict"] == "unreadable" for row in rows)
    print(
        f"{len(rows)} images ({unreadable} unreadable) with {args.workers} workers in {seconds:.1f} s: "
        f"{len(rows) / seconds:.1f} images/s -> {args.out}"
    )


if __name__ == "__main__":
    main()
