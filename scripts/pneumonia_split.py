"""Generate edge_node/datasets/pneumonia/split.json: PneumoniaMNIST's train split by hospital.

The official train split of the shipped `pneumoniamnist.npz` (4,708 images) is divided among the
eight `PNEUMONIA_HOSPITALS` with `dirichlet_partition` (Dirichlet(ALPHA) label skew, numpy
Generator seeded with SEED, whole draws repeated until every hospital has MIN_SAMPLES images).
The edge node reads the stored indices at run time instead of drawing them, so that the split is
the same on every machine and numpy release. Each entry also records its label counts, which the
dataset README tabulates.

Usage, from the repository root:

    PYTHONPATH=. python scripts/pneumonia_split.py          # rewrite split.json
    PYTHONPATH=. python scripts/pneumonia_split.py --check  # exit 1 if split.json is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edge_node.datasets._partition import dirichlet_partition
from edge_node.datasets.pneumonia import (
    ALPHA,
    MIN_SAMPLES,
    PNEUMONIA_HOSPITALS,
    SEED,
    load_official,
)

SPLIT_PATH = (
    Path(__file__).resolve().parent.parent / "edge_node" / "datasets" / "pneumonia" / "split.json"
)
SOURCE = (
    "MedMNIST v2 pneumoniamnist.npz, official train split; "
    "edge_node.datasets._partition.dirichlet_partition(train_labels, 8, "
    f"alpha={ALPHA}, seed={SEED}, min_samples={MIN_SAMPLES})"
)
INDICES = "rows of train_images, counted from 0, sorted; labels = [normal, pneumonia] counts"


def partition() -> tuple[list[NDArray[np.int64]], NDArray[np.int64], int]:
    """The hospitals' train rows, the train labels, and how many draws the floor took."""
    labels = load_official().train_y
    parts, draws = dirichlet_partition(
        labels, len(PNEUMONIA_HOSPITALS), alpha=ALPHA, seed=SEED, min_samples=MIN_SAMPLES
    )
    return parts, labels, draws


def render() -> str:
    """Return the text of split.json: one line per index list keeps the diff readable."""
    parts, labels, draws = partition()
    lines = [
        "{",
        f'  "source": {json.dumps(SOURCE)},',
        '  "generated_by": "scripts/pneumonia_split.py",',
        f'  "indices": {json.dumps(INDICES)},',
        f'  "draws": {draws},',
        '  "hospitals": {',
    ]
    for n, (hospital, rows) in enumerate(zip(PNEUMONIA_HOSPITALS, parts, strict=True)):
        counts = np.bincount(labels[rows], minlength=2).tolist()
        comma = "," if n < len(PNEUMONIA_HOSPITALS) - 1 else ""
        lines += [
            f'    "{hospital}": {{',
            f'      "labels": {json.dumps(counts)},',
            f'      "train": {json.dumps(rows.tolist())}',
            f"    }}{comma}",
        ]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if split.json is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SPLIT_PATH.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{SPLIT_PATH} is out of date: rerun scripts/pneumonia_split.py\n")
            return 1
        return 0
    SPLIT_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
