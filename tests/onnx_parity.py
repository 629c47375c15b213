"""Runs a model Loupe exported to ONNX in runtimes Loupe did not write and compares with Loupe's own outputs.

    python3 tests/onnx_parity.py EXPECTED_DIR [--runtimes onnxruntime,openvino]

EXPECTED_DIR holds `model.onnx` (threshold inputs with the tuned defaults), `required.onnx` (the same with
threshold inputs every call feeds, from the file's metadata), optionally `external.onnx` (weights in
`external.onnx.data`) and `triton/model/` (a Triton repository entry, checked by `triton_repository.py`), and
`expected.jsonl`, one line per image as Loupe scored it:
{"image": path, "score": float, "verdict": 0|1|2, "map": file of little-endian float32 (S*S), "size": S}.
Each image is fed as the camera would give it (uint8 RGB, [1, H, W, 3]); the graph resizes it itself.

Checks the file with onnx.checker (full check, shapes inferred), then per runtime: image score relative error <= 1e-4, map max abs error <= 1e-3 of the map's range, identical
verdicts at the saved thresholds, and verdicts that follow a threshold fed as an input. Prints one JSON line
per runtime with the measured errors; exits 1 when a bound is broken (naming it), 2 when a runtime is missing.
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

SCORE_RELATIVE_ERROR = 1e-4
MAP_ERROR_OF_RANGE = 1e-3


def tuned_thresholds(path):
    """The thresholds a model was tuned with, from its metadata (what a line feeds to required inputs)."""
    import onnx

    metadata = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return {
        "decision_threshold": float(metadata["loupe.decision_threshold"]),
        "review_threshold": float(metadata["loupe.review_threshold"]),
    }


class Runtime:
    """Feeds the tuned thresholds where the graph requires them and the call gives none."""

    def __init__(self, path):
        self.tuned = tuned_thresholds(path)

    def run(self, image, **thresholds):
        feeds = {"image": image}
        for key in ("decision_threshold", "review_threshold"):
            if key in thresholds:
                feeds[key] = np.array(thresholds[key], np.float32)
            elif key in self.required:
                feeds[key] = np.array(self.tuned[key], np.float32)
        return self.infer(feeds)


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path):
        import onnxruntime as ort

        super().__init__(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3  # the threshold inputs have defaults: ORT warns about that on purpose
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        # Inputs with defaults are listed as overridable initializers, the others as inputs.
        required = {i.name for i in self.session.get_inputs()}
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.required = required - {"image"}
        self.threshold_inputs = {"decision_threshold", "review_threshold"} <= required | overridable

    def infer(self, feeds):
        anomaly_map, score, verdict = self.session.run(["anomaly_map", "score", "verdict"], feeds)
        return anomaly_map, score, verdict


class OpenVino(Runtime):
    name = "openvino"

    def __init__(self, path):
        import openvino as ov

        super().__init__(path)
        core = ov.Core()
        model = core.read_model(path)
        names = {i.get_any_name() for i in model.inputs}
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"})
        # OpenVINO folds an input that has a default (an initializer) into a constant: with `model.onnx` the
        # verdict always uses the tuned thresholds, with `required.onnx` they are inputs it is fed.
        self.threshold_inputs = {"decision_threshold", "review_threshold"} <= names
        self.required = names - {"image"}

    def infer(self, feeds):
        out = self.compiled(feeds)
        return tuple(out[self.compiled.output(name)] for name in ("anomaly_map", "score", "verdict"))


RUNTIMES = {"onnxruntime": OnnxRuntime, "openvino": OpenVino}


def load_rgb(path):
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)[None])


def map_span(loupe_map):
    """What a map's error is measured against: its range; an image-level method's map is its score everywhere
    (no range), so its magnitude."""
    magnitude = float(np.abs(loupe_map).max())
    span = float(loupe_map.max() - loupe_map.min())
    if span <= 1e-6 * magnitude:
        span = magnitude
    return max(span, 1e-12)


def errors_against(row, base, anomaly_map, score):
    """One image's output against Loupe's line in expected.jsonl: map error as a share of Loupe's map range,
    the absolute map error, that range (`map_span`), and the score's relative error."""
    want_map = np.fromfile(os.path.join(base, row["map"]), dtype="<f4").reshape(row["size"], row["size"])
    span = map_span(want_map)
    largest = float(np.abs(anomaly_map - want_map).max())
    return largest / span, largest, span, abs(float(score) - row["score"]) / max(abs(row["score"]), 1e-12)


def check(runtime, expected, base, file, score_bound, map_bound):
    worst_score = worst_map = worst_abs = 0.0
    smallest_span = float("inf")
    mismatched = []
    scores = []
    for row in expected:
        image = load_rgb(row["image"])
        anomaly_map, score, verdict = runtime.run(image)
        map_error, map_abs, span, score_error = errors_against(row, base, anomaly_map[0], score[0])
        worst_map, worst_abs = max(worst_map, map_error), max(worst_abs, map_abs)
        smallest_span = min(smallest_span, span)
        worst_score = max(worst_score, score_error)
        if int(verdict[0]) != row["verdict"]:
            mismatched.append(row["image"])
        scores.append((image, float(score[0])))
    # A threshold fed as an input moves the verdicts without a new export.
    middle = float(np.median([s for _, s in scores]))
    moved = 0
    for image, score in scores[:8] if runtime.threshold_inputs else []:
        _, _, verdict = runtime.run(image, decision_threshold=middle, review_threshold=middle)
        moved += int(verdict[0]) != (2 if score >= middle else 0)
    failures = []
    if worst_score > score_bound:
        failures.append(f"score relative error {worst_score:.2e} > {score_bound}")
    if worst_map > map_bound:
        failures.append(f"map error {worst_map:.2e} of its range > {map_bound}")
    if mismatched:
        failures.append(f"verdicts differ on {len(mismatched)} images, e.g. {mismatched[0]}")
    if moved:
        failures.append(f"{moved} verdicts ignore the decision_threshold input")
    report = {
        "runtime": runtime.name,
        "file": file,
        "images": len(expected),
        "max_score_relative_error": worst_score,
        "max_map_error_of_range": worst_map,
        "max_map_abs_error": worst_abs,
        "smallest_map_range": smallest_span,
        "verdict_mismatches": len(mismatched),
        "threshold_inputs": "fed" if runtime.threshold_inputs else "folded to the tuned values",
        "failures": failures,
    }
    print(json.dumps(report))
    return not failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("expected_dir")
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--score-error", type=float, default=SCORE_RELATIVE_ERROR, help="bound, relative")
    parser.add_argument("--map-error", type=float, default=MAP_ERROR_OF_RANGE, help="bound, of the map's range")
    args = parser.parse_args()
    base = args.expected_dir
    with open(os.path.join(base, "expected.jsonl")) as lines:
        expected = [json.loads(line) for line in lines]
    import onnx

    ok = True
    for file in ("model.onnx", "required.onnx", "external.onnx"):
        path = os.path.join(base, file)
        if file == "external.onnx":
            if not os.path.exists(path):
                continue
            # The weights must really be outside: a model file of graph and small constants only.
            inline = [t.name for t in onnx.load(path, load_external_data=False).graph.initializer
                      if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
            if inline or not os.path.exists(path + ".data"):
                print(f"{file}: weights not in {file}.data (inline: {inline[:3]})", file=sys.stderr)
                ok = False
        onnx.checker.check_model(path, full_check=True)
        for name in args.runtimes.split(","):
            try:
                runtime = RUNTIMES[name](path)
            except ImportError as error:
                print(f"{name} is not installed ({error}): pip install -r tests/requirements.txt", file=sys.stderr)
                sys.exit(2)
            if file == "required.onnx" and not runtime.threshold_inputs:
                print(f"{name}: required.onnx has no threshold inputs", file=sys.stderr)
                ok = False
            ok &= check(runtime, expected, base, file, args.score_error, args.map_error)
    triton_entry = os.path.join(base, "triton", "model")
    if os.path.isdir(triton_entry):
        from triton_repository import check_repository

        ok &= check_repository(triton_entry, base)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
