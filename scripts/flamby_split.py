"""Generate edge_node/datasets/heart_disease/split.json: FLamby's per-hospital train/test rows.

FLamby's Fed-Heart-Disease (owkin/FLamby, flamby/datasets/fed_heart_disease/dataset.py) splits
each hospital's rows, after its missing-value filter, with scikit-learn:

    train_test_split(np.arange(nb), test_size=1.0 - 0.66, train_size=0.66,
                     random_state=43, shuffle=True, stratify=stratify)

where `stratify` is the 0/1 label when both labels occur more than twice, else None. FLamby uses
the result only as a set (`i in indices_test`) and keeps file order, so the indices are stored
sorted. The edge node reads this file at run time and so never imports scikit-learn.

Usage, from the repository root (scikit-learn is a dev dependency):

    PYTHONPATH=. python scripts/flamby_split.py          # rewrite split.json
    PYTHONPATH=. python scripts/flamby_split.py --check  # exit 1 if split.json is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from edge_node.datasets.heart_disease import HEART_DISEASE_HOSPITALS, hospital_records

SPLIT_PATH = (
    Path(__file__).resolve().parent.parent
    / "edge_node"
    / "datasets"
    / "heart_disease"
    / "split.json"
)
TRAIN_FRACTION = 0.66
RANDOM_STATE = 43
SOURCE = (
    "owkin/FLamby flamby/datasets/fed_heart_disease/dataset.py: train_test_split(np.arange(nb), "
    "test_size=1.0 - 0.66, train_size=0.66, random_state=43, shuffle=True, "
    "stratify=labels if both labels occur more than twice else None)"
)
INDICES = (
    "rows of processed.<hospital>.data that survive the missing-value filter, counted from 0, "
    "sorted"
)


def flamby_split(labels: NDArray[np.int64]) -> tuple[list[int], list[int]]:
    """Return sorted train and test row indices exactly as FLamby's dataset.py draws them."""
    nb = len(labels)
    levels = np.unique(labels)
    stratify = (
        labels if len(levels) > 1 and all((labels == lev).sum() > 2 for lev in levels) else None
    )
    indices_train, indices_test = train_test_split(
        np.arange(nb),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=RANDOM_STATE,
        shuffle=True,
        stratify=stratify,
    )
    return sorted(int(i) for i in indices_train), sorted(int(i) for i in indices_test)


def render() -> str:
    """Return the text of split.json: one line per index list keeps the diff readable."""
    lines = [
        "{",
        f'  "source": {json.dumps(SOURCE)},',
        '  "generated_by": "scripts/flamby_split.py",',
        f'  "indices": {json.dumps(INDICES)},',
        '  "hospitals": {',
    ]
    for n, hospital in enumerate(HEART_DISEASE_HOSPITALS):
        _, labels = hospital_records(hospital)
        train, test = flamby_split(labels)
        comma = "," if n < len(HEART_DISEASE_HOSPITALS) - 1 else ""
        lines += [
            f'    "{hospital}": {{',
            f'      "rows": {len(labels)},',
            f'      "train": {json.dumps(train)},',
            f'      "test": {json.dumps(test)}',
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
            sys.stderr.write(f"{SPLIT_PATH} is out of date: rerun scripts/flamby_split.py\n")
            return 1
        return 0
    SPLIT_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
