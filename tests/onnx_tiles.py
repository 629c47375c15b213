"""A line runtime for a tiled Loupe model, written from the ONNX file's metadata alone (README, "High-resolution
parts"), and the check that it scores camera frames as Loupe does.

    python3 tests/onnx_tiles.py EXPECTED_DIR

EXPECTED_DIR holds `model.onnx` and `expected.jsonl`, one line per frame as Loupe scored it:
{"image": path, "score": float, "verdict": 0|1|2, "map": file of little-endian float32, "width": W, "height": H}
(the stitched map, W × H cells).

`score_frame` is the runtime: it cuts the frame into the views `loupe.geometry` describes, feeds each view to the
graph as a camera image (the graph resizes it), stitches the views' maps with the same cross-fade as Loupe, takes
the stitched map's maximum inside the region of interest as the frame's score, and decides against
`loupe.decision_threshold` / `loupe.review_threshold`. Exits 1 when a score (relative error > 1e-4), a map
(> 1e-3 of its range) or a verdict differs; prints one JSON line with the errors.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image

SCORE_RELATIVE_ERROR = 1e-4
MAP_ERROR_OF_RANGE = 1e-3
MAX_MAP_SIDE = 2048


def round_half_away(value):
    return int(math.floor(value + 0.5))


def tile_starts(length, tile, overlap):
    """Starts of tiles along a side, spread evenly with neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    span = length - tile
    stride = tile - min(overlap, tile - 1)
    gaps = -(-span // stride)
    return [(i * span + gaps // 2) // gaps for i in range(gaps + 1)]


def views(layout, width, height):
    """(x, y, w, h) of every view, row by row."""
    if layout == "whole":
        return [(0, 0, width, height)]
    if layout == "keep_aspect":
        side = max(width, height)
        return [(0, 0, side, side)]
    tile, overlap = layout["tiles"]["tile"], layout["tiles"]["overlap"]
    view_width, view_height = min(tile, width), min(tile, height)
    return [(x, y, view_width, view_height)
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def region_mask(points, width, height, scale):
    """1 where a cell's centre is inside the polygon (even-odd), at `scale` cells per image pixel."""
    mask = np.zeros((height, width), np.uint8)
    corners = [(x * scale, y * scale) for x, y in points]
    for row in range(height):
        centre = row + 0.5
        crossings = []
        for i, (ax, ay) in enumerate(corners):
            bx, by = corners[(i + 1) % len(corners)]
            if (ay <= centre) != (by <= centre):
                crossings.append(ax + (centre - ay) / (by - ay) * (bx - ax))
        crossings.sort()
        for start, end in zip(crossings[0::2], crossings[1::2]):
            first = max(math.ceil(start - 0.5), 0)
            last = min(max(math.ceil(end - 0.5), 0), width)
            mask[row, min(first, last):last] = 1
    return mask


def resized(grid, width, height):
    """Bilinear resize with half-pixel centres, in float32, as Loupe resizes a map."""
    def source(out_size, in_size):
        scale = np.float32(in_size) / np.float32(out_size)
        position = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                              np.float32(0))
        low = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (position - low.astype(np.float32)).astype(np.float32)

    if grid.shape == (height, width):
        return grid
    x0, x1, tx = source(width, grid.shape[1])
    y0, y1, ty = source(height, grid.shape[0])
    top = grid[y0][:, x0] + (grid[y0][:, x1] - grid[y0][:, x0]) * tx
    bottom = grid[y1][:, x0] + (grid[y1][:, x1] - grid[y1][:, x0]) * tx
    return (top + (bottom - top) * ty[:, None]).astype(np.float32)


def crop(frame, x, y, w, h):
    """The view's pixels, the frame's last row and column repeated past its edge."""
    rows = np.minimum(np.arange(y, y + h), frame.shape[0] - 1)
    columns = np.minimum(np.arange(x, x + w), frame.shape[1] - 1)
    return np.ascontiguousarray(frame[rows][:, columns])


def score_frame(session, frame, geometry, input_size, thresholds):
    """Score, stitched map and verdict (0 good, 1 review, 2 defect) of one H × W × 3 uint8 frame."""
    height, width = frame.shape[:2]
    layout = geometry.get("layout", "whole")
    all_views = views(layout, width, height)
    first = all_views[0]
    scale = min(input_size / max(first[2], first[3]), MAX_MAP_SIDE / max(width, height), 1.0)
    map_width, map_height = max(round_half_away(width * scale), 1), max(round_half_away(height * scale), 1)
    region = geometry.get("region")
    inside_region = region_mask(region["points"], map_width, map_height, scale) if region else None

    def cell(v):
        return round_half_away(v * scale)

    def kept(view):
        if inside_region is None:
            return True
        x, y, w, h = view
        x0, y0 = min(cell(x), map_width - 1), min(cell(y), map_height - 1)
        x1, y1 = max(min(cell(x + w), map_width), x0 + 1), max(min(cell(y + h), map_height), y0 + 1)
        return inside_region[y0:y1, x0:x1].any()

    overlap = layout["tiles"]["overlap"] if isinstance(layout, dict) else 0
    ramp = np.float32(max(overlap * scale, 1.0))
    total = np.zeros((map_height, map_width), np.float32)
    weight = np.zeros((map_height, map_width), np.float32)
    for x, y, w, h in filter(kept, all_views):
        view_map = session.run(["anomaly_map"], {"image": crop(frame, x, y, w, h)[None]})[0][0]
        x0, y0 = cell(x), cell(y)
        full_width, full_height = max(cell(x + w) - x0, 1), max(cell(y + h) - y0, 1)
        tile_map = resized(view_map.astype(np.float32), full_width, full_height)

        def edge(n):
            i = np.arange(n)
            return np.minimum((np.minimum(i, n - 1 - i).astype(np.float32) + np.float32(0.5)) / ramp, np.float32(1))

        w_map = edge(full_height)[:, None] * edge(full_width)[None, :]
        clip_h, clip_w = min(full_height, map_height - y0), min(full_width, map_width - x0)
        total[y0:y0 + clip_h, x0:x0 + clip_w] += (w_map * tile_map)[:clip_h, :clip_w]
        weight[y0:y0 + clip_h, x0:x0 + clip_w] += w_map[:clip_h, :clip_w]
    inside = weight > 0
    if inside_region is not None:
        inside &= inside_region == 1
    stitched = np.full((map_height, map_width), np.nan, np.float32)
    stitched[inside] = total[inside] / weight[inside]
    floor = float(np.nanmin(stitched)) if inside.any() else 0.0
    stitched[~inside] = floor
    score = float(stitched[inside_region == 1].max()) if inside_region is not None else float(stitched.max())
    decision, review = thresholds
    verdict = 2 if score >= decision else (1 if score >= review else 0)
    return score, stitched, verdict


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("expected_dir")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort

    path = os.path.join(args.expected_dir, "model.onnx")
    metadata = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    geometry = json.loads(metadata["loupe.geometry"])
    input_size = int(metadata["loupe.image_size"])
    # Thresholds are written as the shortest text of a float32: read them back as float32, as Loupe compares.
    thresholds = tuple(float(np.float32(metadata[f"loupe.{name}_threshold"])) for name in ("decision", "review"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    with open(os.path.join(args.expected_dir, "expected.jsonl")) as lines:
        expected = [json.loads(line) for line in lines]
    worst_score = worst_map = 0.0
    mismatched = []
    for row in expected:
        frame = np.asarray(Image.open(row["image"]).convert("RGB"), dtype=np.uint8)
        score, stitched, verdict = score_frame(session, frame, geometry, input_size, thresholds)
        want = np.fromfile(os.path.join(args.expected_dir, row["map"]), dtype="<f4")
        want = want.reshape(row["height"], row["width"])
        if stitched.shape != want.shape:
            print(f"{row['image']}: map {stitched.shape} where Loupe's is {want.shape}", file=sys.stderr)
            sys.exit(1)
        span = max(float(want.max() - want.min()), 1e-12)
        worst_map = max(worst_map, float(np.abs(stitched - want).max()) / span)
        worst_score = max(worst_score, abs(score - row["score"]) / max(abs(row["score"]), 1e-12))
        if verdict != row["verdict"]:
            mismatched.append(row["image"])
    failures = []
    if worst_score > SCORE_RELATIVE_ERROR:
        failures.append(f"score relative error {worst_score:.2e} > {SCORE_RELATIVE_ERROR}")
    if worst_map > MAP_ERROR_OF_RANGE:
        failures.append(f"map error {worst_map:.2e} of its range > {MAP_ERROR_OF_RANGE}")
    if mismatched:
        failures.append(f"verdicts differ on {len(mismatched)} frames, e.g. {mismatched[0]}")
    print(json.dumps({"frames": len(expected), "geometry": geometry, "max_score_relative_error": worst_score,
                      "max_map_error_of_range": worst_map, "failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
