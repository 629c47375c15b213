"""Checks a Triton model repository entry Loupe wrote (`loupe export --format triton`) as far as a machine without
Triton Inference Server can.

    python3 tests/triton_repository.py REPO/NAME [EXPECTED_DIR]

What is checked:
- `config.pbtxt` parses as Triton's own `ModelConfig` message (from the `tritonclient` package: an unknown field,
  a misspelt enum or bad syntax fails here as it would when the server loads the repository);
- the config names the ONNX Runtime backend, enables dynamic batching, and its inputs and outputs match the ONNX
  model in `1/model.onnx` (names, data types, and shapes once Triton's batch dimension and `reshape` are applied);
- the model has no input besides the batched `image` (the thresholds are graph constants);
- what the dynamic batcher does: requests of the same frame size stacked into one batch of up to
  `max_batch_size` give, image by image, the outputs each request gets alone;
- with EXPECTED_DIR (as `tests/onnx_parity.py` reads it): the batched outputs match Loupe's scores, maps and
  verdicts within the parity bounds.

Not checked here: that a Triton server loads and serves the entry. The server ships only in NVIDIA's containers
(the PyPI `tritonserver` package is a placeholder that refuses to install), which this machine cannot fetch.
Prints one JSON line; exits 1 on a failure (named), 2 when a package is missing.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from onnx_parity import MAP_ERROR_OF_RANGE, SCORE_RELATIVE_ERROR, errors_against, load_rgb  # noqa: E402

ONNX_TO_TRITON = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


def parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    with open(path) as text:
        return text_format.Parse(text.read(), model_config_pb2.ModelConfig())


def shapes_agree(model_shape, triton_shape):
    """A model dimension that is a name (symbolic) or None agrees with -1; numbers must be equal."""
    if len(model_shape) != len(triton_shape):
        return False
    return all(t == -1 or (isinstance(m, int) and m == t) for m, t in zip(model_shape, triton_shape))


def check_repository(entry, expected_dir=None):
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2

    failures = []
    from google.protobuf.text_format import ParseError

    try:
        config = parse_config(os.path.join(entry, "config.pbtxt"))
    except ParseError as error:
        print(json.dumps({"entry": entry, "failures": [f"config.pbtxt is not a Triton ModelConfig: {error}"]}))
        return False
    data_type = model_config_pb2.DataType.Name
    if config.name != os.path.basename(os.path.normpath(entry)):
        failures.append(f"config name {config.name!r} is not the folder's name")
    if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
        failures.append(f"backend {config.backend!r} / platform {config.platform!r} is not ONNX Runtime")
    if config.max_batch_size < 1 or not config.HasField("dynamic_batching"):
        failures.append("no dynamic batching (max_batch_size >= 1 and dynamic_batching {})")
    model_path = os.path.join(entry, "1", "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    model_inputs = {i.name: i for i in session.get_inputs()}
    if session.get_overridable_initializers():
        failures.append("the model has overridable inputs besides the batched image (thresholds should be constants)")
    batched = [-1] if config.max_batch_size > 0 else []
    for tensor, model_side, kind in [(i, model_inputs, "input") for i in config.input] + [
        (o, {o.name: o for o in session.get_outputs()}, "output") for o in config.output
    ]:
        model_tensor = model_side.get(tensor.name)
        if model_tensor is None:
            failures.append(f"{kind} {tensor.name} is not in the model")
            continue
        if ONNX_TO_TRITON.get(model_tensor.type) != data_type(tensor.data_type):
            failures.append(f"{kind} {tensor.name}: model {model_tensor.type}, config {data_type(tensor.data_type)}")
        dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        if not shapes_agree(model_tensor.shape, batched + dims):
            failures.append(f"{kind} {tensor.name}: model shape {model_tensor.shape}, config {batched + dims}")
    if set(model_inputs) != {i.name for i in config.input}:
        failures.append(f"model inputs {sorted(model_inputs)} are not the config's")

    # The dynamic batcher: same-size requests stacked, outputs split back per request.
    report = {"entry": entry, "max_batch_size": config.max_batch_size}
    if expected_dir:
        with open(os.path.join(expected_dir, "expected.jsonl")) as lines:
            expected = [json.loads(line) for line in lines]
        by_size = {}
        for row in expected:
            image = load_rgb(row["image"])
            by_size.setdefault(image.shape[1:3], []).append((row, image))
        worst_batching = worst_score = worst_map = 0.0
        mismatched = 0
        batches = 0
        for group in by_size.values():
            for start in range(0, len(group), config.max_batch_size):
                chunk = group[start : start + config.max_batch_size]
                maps, scores, verdicts = session.run(None, {"image": np.concatenate([image for _, image in chunk])})
                batches += 1
                for index, (row, image) in enumerate(chunk):
                    alone_map, alone_score, _ = session.run(None, {"image": image})
                    worst_batching = max(worst_batching, abs(float(alone_score[0]) - float(scores[index])))
                    map_error, _, _, score_error = errors_against(row, expected_dir, maps[index], scores[index])
                    worst_map, worst_score = max(worst_map, map_error), max(worst_score, score_error)
                    mismatched += int(verdicts[index]) != row["verdict"]
        if worst_score > SCORE_RELATIVE_ERROR:
            failures.append(f"batched score relative error {worst_score:.2e} > {SCORE_RELATIVE_ERROR}")
        if worst_map > MAP_ERROR_OF_RANGE:
            failures.append(f"batched map error {worst_map:.2e} of its range > {MAP_ERROR_OF_RANGE}")
        if mismatched:
            failures.append(f"{mismatched} batched verdicts differ from Loupe's")
        report.update(
            images=len(expected),
            batches=batches,
            max_batched_vs_alone_score_difference=worst_batching,
            max_score_relative_error=worst_score,
            max_map_error_of_range=worst_map,
            verdict_mismatches=mismatched,
        )
    report["failures"] = failures
    print(json.dumps(report))
    return not failures


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    try:
        ok = check_repository(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
    except ImportError as error:
        print(f"{error}: pip install -r tests/requirements.txt", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
