#!/usr/bin/env python3
"""PyTorch's side of the backbone benchmark: timm's efficientnet_lite0 at 256², batch 1 and 32, timed as
`loupe bench backbone` times Loupe's (median over repeats after warm-up, synchronised). Untrained weights:
the arithmetic is what is timed. Prints `batch N: median … ms (… images/s)` lines for scripts/gpu_check.sh."""
import argparse
import statistics
import time

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda")
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()
try:
    import timm
    import torch
except ImportError as missing:
    raise SystemExit(f"PyTorch side not run: {missing}")

device = torch.device(args.device)
net = timm.create_model("efficientnet_lite0", pretrained=False).eval().to(device)
for batch in (1, 32):
    x = torch.rand(batch, 3, args.size, args.size, device=device)
    times = []
    with torch.inference_mode():
        for step in range(args.repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            net.forward_features(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 3:
                times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(f"batch {batch}: median {median * 1e3:.2f} ms ({batch / median:.0f} images/s), torch {torch.__version__}")
