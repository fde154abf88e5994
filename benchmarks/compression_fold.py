"""Decode-and-fold time of compressed deltas against a plain dense numpy add, per model size.

    python -m benchmarks.compression_fold [--json OUT] [--repeats N]

For each model layout (the built-in CNN at widths 16 and 128, and a ResNet-18 layout of 11.7 M
parameters) and each compression setting, it compresses one random delta, then times
``accumulate`` of every tensor into a float32 accumulator with a weight, against
``acc[name] += delta[name]`` over the same arrays in the same process, alternating the two;
the best of ``--repeats`` of each, in process CPU time and in wall time.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aggregator.fold import accumulate
from benchmarks._report import best_of
from common.compression import compress
from common.messages import CompressedTensor, Compression, Quantization

Layout = dict[str, tuple[int, ...]]


def cnn(width: int) -> Layout:
    """The built-in ``cnn`` model's parameters for 28x28 single-channel images."""
    w = width
    return {
        "0.weight": (w, 1, 3, 3),
        "0.bias": (w,),
        "3.weight": (2 * w, w, 3, 3),
        "3.bias": (2 * w,),
        "7.weight": (64, 2 * w * 7 * 7),
        "7.bias": (64,),
        "9.weight": (2, 64),
        "9.bias": (2,),
    }


def resnet18() -> Layout:
    """torchvision's ResNet-18 parameters (weights, biases, batch-norm affine): 11.7 M entries."""
    layout: Layout = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    channels = 64
    for stage, out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            first_in = channels if block == 0 else out
            layout[f"{prefix}.conv1.weight"] = (out, first_in, 3, 3)
            layout[f"{prefix}.conv2.weight"] = (out, out, 3, 3)
            for bn in ("bn1", "bn2"):
                layout[f"{prefix}.{bn}.weight"] = (out,)
                layout[f"{prefix}.{bn}.bias"] = (out,)
            if block == 0 and first_in != out:
                layout[f"{prefix}.downsample.0.weight"] = (out, first_in, 1, 1)
                layout[f"{prefix}.downsample.1.weight"] = (out,)
                layout[f"{prefix}.downsample.1.bias"] = (out,)
        channels = out
    layout["fc.weight"] = (1000, 512)
    layout["fc.bias"] = (1000,)
    return layout


LAYOUTS: dict[str, Layout] = {"cnn-16": cnn(16), "cnn-128": cnn(128), "resnet18": resnet18()}
SETTINGS: dict[str, Compression] = {
    "dense-fp32": Compression(),
    "fp16": Compression(quantization=Quantization.FP16),
    "int8": Compression(quantization=Quantization.INT8),
    "top10%-int8": Compression(top_k=0.1, quantization=Quantization.INT8),
    "top1%-fp16": Compression(top_k=0.01, quantization=Quantization.FP16),
}
WEIGHT = 0.37


def fold_pair(
    delta: dict[str, np.ndarray], tensors: tuple[CompressedTensor, ...]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(dense add of ``delta``, decode-and-fold of ``tensors``) into one float32 accumulator."""
    acc = {name: np.zeros(value.shape, dtype=np.float32) for name, value in delta.items()}

    def dense_add() -> None:
        for name, value in delta.items():
            acc[name] += value

    def fold() -> None:
        for tensor in tensors:
            accumulate(tensor, acc[tensor.name], WEIGHT)

    return dense_add, fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for model, layout in LAYOUTS.items():
        delta = {
            name: (rng.standard_normal(shape) * 1e-3).astype(np.float32)
            for name, shape in layout.items()
        }
        params = sum(math.prod(shape) for shape in layout.values())
        for setting, policy in SETTINGS.items():
            tensors = compress(delta, policy).tensors
            dense_add, fold = fold_pair(delta, tensors)
            timings = best_of(args.repeats, dense_add, fold)
            wire = sum(len(t.indices) + len(t.values) for t in tensors)
            row: dict[str, object] = {
                "model": model,
                "params": params,
                "tensors": len(layout),
                "setting": setting,
                "wire_bytes": wire,
            }
            for clock, (base, folded) in timings.items():
                row |= {
                    f"dense_add_ms_{clock}": base * 1e3,
                    f"fold_ms_{clock}": folded * 1e3,
                    f"fold_ratio_{clock}": folded / base,
                }
            rows.append(row)
            base, folded = timings["cpu"]
            print(
                f"{model:9} {params:>10,} params  {setting:12} {wire:>11,} B  "
                f"cpu: add {base * 1e3:8.3f} ms  fold {folded * 1e3:8.3f} ms  "
                f"ratio {folded / base:5.2f}  (wall ratio {row['fold_ratio_wall']:5.2f})"
            )
    if args.json:
        args.json.write_text(json.dumps({"weight": WEIGHT, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
