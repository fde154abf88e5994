"""An edge node's local datasets: turn a dataset spec string into a train/test `LocalDataset`.

Data never leaves the hospital: a node names its data with a spec in its settings and loads it
here, with numpy only. The spec grammar:

``heart-disease:<hospital>``
    The built-in UCI Heart Disease data of one hospital (`HEART_DISEASE_HOSPITALS`), preprocessed
    and split as in FLamby's Fed-Heart-Disease; see `edge_node.datasets.heart_disease`.

``pneumonia:<hospital>``
    The built-in PneumoniaMNIST chest X-rays: one of eight simulated hospitals
    (`PNEUMONIA_HOSPITALS`, a Dirichlet(0.5) label-skew share of the official train split), tested
    on the whole official test split; see `edge_node.datasets.pneumonia`.

``csv:<path>`` or ``csv:<path>#<key>=<value>&...``
    A CSV file with a header row, numeric cells and one integer label column. The keys are
    ``label`` (the label column, default ``label``), ``test`` (a test CSV with the same columns),
    ``test_fraction`` (default 0.34) and ``seed`` (default 0); the last two drive a seeded split,
    stratified where every class has two rows or more, used when ``test`` is absent. Values are
    taken literally (no URL decoding), so a path may not contain ``#`` or ``&``; relative paths
    are relative to the working directory. Labels are remapped to 0..C-1 in sorted order of all
    labels seen; columns other than 0/1 columns are standardised with the train split's mean and
    std. Example: ``csv:site_a.csv#label=outcome&test_fraction=0.25&seed=7``.

``npz:<path>``
    An image archive in MedMNIST's layout: uint8 ``train_images``, ``train_labels``,
    ``test_images`` and ``test_labels`` (``val_*`` ignored). Images become float32
    ``(N, C, H, W)`` in [0, 1]; labels int64 ``(N,)``.

``<module.path>:<function>``
    A plug-in: the module is imported and ``function()`` must return a `LocalDataset`.

Every failure to build a dataset raises `DatasetError`, whose message names the spec, file,
line or column at fault.
"""

from __future__ import annotations

from ._csv_loader import CsvPreprocessing, csv_preprocessing
from ._dataset import DatasetError, LocalDataset
from ._scaling import Scaling, fit_scaling
from ._spec import csv_arguments, load_dataset
from .heart_disease import HEART_DISEASE_HOSPITALS
from .pneumonia import PNEUMONIA_HOSPITALS

__all__ = [
    "HEART_DISEASE_HOSPITALS",
    "PNEUMONIA_HOSPITALS",
    "CsvPreprocessing",
    "DatasetError",
    "LocalDataset",
    "Scaling",
    "csv_arguments",
    "csv_preprocessing",
    "fit_scaling",
    "load_dataset",
]
