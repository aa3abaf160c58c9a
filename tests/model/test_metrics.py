"""Feature-set distances: the Frechet distance against closed forms, precision and recall by hand."""

import numpy as np
import pytest
import torch

from model.metrics import frechet_distance, knn_radii, precision_recall


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # N(0, I) vs N(1, 4I) in 4 dims: |mu|^2 = 4, trace term = 4 * (1 + 4 - 2 * 2) = 4.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200_000, 4))
    b = rng.normal(size=(200_000, 4)) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.02)


def test_frechet_distance_handles_correlated_covariances():
    # Closed form for 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2, embedded in a rotated 2-D space.
    rng = np.random.default_rng(1)
    rot = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    a = (rng.normal(size=(200_000, 2)) * [1.0, 3.0]) @ rot.T
    b = (rng.normal(size=(200_000, 2)) * [2.0, 1.0]) @ rot.T + rot @ [0.5, 0.0]
    expected = 0.25 + (1 - 2) ** 2 + (3 - 1) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_knn_radii_are_the_distance_to_the_kth_other_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    torch.testing.assert_close(knn_radii(x, 1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(x, 2, chunk=3), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be in 1..3"):
        knn_radii(x, 4)


def test_precision_and_recall_match_a_hand_computation():
    # Real points 0, 1, 2, 3 on a line (k = 1: every radius is 1); two fakes, one on the manifold.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # Precision: 0.5 lies within 1 of a real point, 10 does not. Recall: each fake's radius is 9.5 (the
    # distance to the other fake), so every real point lies within 9.5 of 0.5.
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # Fakes bunched at one end cover little of the real set: precision 1, recall low.
    bunched = np.array([[0.0], [0.1], [0.2]])
    assert precision_recall(real, bunched, k=1) == (1.0, 0.25)


def test_precision_and_recall_of_a_set_with_itself_are_one_and_need_matching_dimensions():
    x = np.random.default_rng(0).normal(size=(300, 5))
    assert precision_recall(x, x) == (1.0, 1.0)
    with pytest.raises(ValueError, match="one D"):
        precision_recall(x, x[:, :3])
