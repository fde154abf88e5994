"""Specification of the named federations: every site's data fits the federation's model."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from common.messages import Identifier
from common.models import build_model
from edge_node.datasets import PNEUMONIA_HOSPITALS, load_dataset
from healthnet.federations import FEDERATIONS, HEART_DISEASE, PNEUMONIA, Federation

ALL = [pytest.param(federation, id=name) for name, federation in FEDERATIONS.items()]


def test_federations_are_registered_under_their_own_names() -> None:
    """FEDERATIONS maps each name to the federation of that name, pneumonia included."""
    assert {name: fed.name for name, fed in FEDERATIONS.items()} == {
        "heart-disease": "heart-disease",
        "pneumonia": "pneumonia",
    }


@pytest.mark.parametrize("federation", ALL)
def test_sites_have_distinct_valid_node_ids(federation: Federation) -> None:
    """Node ids are unique and valid protocol identifiers (they appear in topics)."""
    ids = [site.node_id for site in federation.sites]
    assert len(set(ids)) == len(ids)
    for node_id in ids:
        TypeAdapter(Identifier).validate_python(node_id)


@pytest.mark.parametrize("federation", ALL)
def test_knobs_can_fold_and_the_demo_runs_some_versions(federation: Federation) -> None:
    """K never exceeds the number of sites, so that a version can always be folded."""
    assert 1 <= federation.knobs.buffer_size <= len(federation.sites)
    assert federation.demo_versions >= 1


@pytest.mark.parametrize("federation", ALL)
def test_every_sites_data_fits_the_model(federation: Federation) -> None:
    """Each site's dataset loads, and the model maps a batch of it to one logit per class."""
    model = build_model(federation.model, seed=0)
    for site in federation.sites:
        dataset = load_dataset(site.data)
        with torch.no_grad():
            logits = model(torch.from_numpy(dataset.train_x[:4]))
        assert tuple(logits.shape) == (4, dataset.num_classes), site.node_id


def test_pneumonia_runs_the_cnn_at_the_eight_hospitals() -> None:
    """The pneumonia federation is the built-in CNN on pneumonia:hospital-1..8."""
    assert PNEUMONIA.model.name == "cnn"
    assert PNEUMONIA.model.kwargs["in_channels"] == 1
    assert [site.node_id for site in PNEUMONIA.sites] == list(PNEUMONIA_HOSPITALS)
    specs = [f"pneumonia:{hospital}" for hospital in PNEUMONIA_HOSPITALS]
    assert [site.data for site in PNEUMONIA.sites] == specs


def test_heart_disease_demo_keeps_its_sixty_versions() -> None:
    """The default demo federation still runs 60 versions at K = 3."""
    assert HEART_DISEASE.demo_versions == 60
    assert HEART_DISEASE.knobs.buffer_size == 3


def test_only_pneumonia_trains_on_the_logit_adjusted_loss() -> None:
    """The label-skewed pneumonia hospitals train on the logit-adjusted loss (tau 1); heart
    disease keeps plain cross-entropy, and neither sets a step budget."""
    assert PNEUMONIA.knobs.training.logit_adjustment == 1.0
    assert HEART_DISEASE.knobs.training.logit_adjustment == 0.0
    assert PNEUMONIA.knobs.training.steps is None
    assert HEART_DISEASE.knobs.training.steps is None


def test_pneumonia_trains_with_a_local_adam_step_of_2e_3() -> None:
    """The pneumonia hospitals train one epoch of Adam at 2e-3 per update (the limit benchmark's
    best local step at K = 4); heart disease keeps SGD at 0.05."""
    assert PNEUMONIA.knobs.training.optimizer == "adam"
    assert PNEUMONIA.knobs.training.learning_rate == 2e-3
    assert PNEUMONIA.knobs.buffer_size == 4
    assert HEART_DISEASE.knobs.training.learning_rate == 0.05
