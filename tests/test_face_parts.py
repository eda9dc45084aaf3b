"""The face tasks' pure parts against hand computations: A-Softmax (`AngleLinear`, `angle_loss`), LFW's 10-fold
verification accuracy, CPG's expression class weights."""

import math

import numpy as np
import pytest
import torch

from clrun.metrics import verification_accuracy, verification_folds
from clrun.models.faces import AngleLinear, FaceHead, angle_lambda, angle_logits, angle_loss, class_weights

# ---- A-Softmax ---------------------------------------------------------------------------------------------------


def at_angle(radius: float, degrees: float) -> list[float]:
    return [radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees))]


def test_angle_linear_by_hand():
    layer = AngleLinear(2, 2, m=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # class directions 0 and 90 degrees, renormalised
    x = torch.tensor([at_angle(2.0, 30.0), at_angle(0.5, 100.0)], dtype=torch.float64)
    cos, phi = layer.double()(x)
    # sample 0, |x| = 2: theta = 30 deg (k = floor(4 * 30 / 180) = 0) and 60 deg (k = 1)
    #   cos: 2 cos 30 = sqrt 3, 2 cos 60 = 1;  phi: 2 cos 120 = -1, 2 (-cos 240 - 2) = -3
    # sample 1, |x| = 0.5: theta = 100 deg (k = 2) and 10 deg (k = 0)
    #   cos: 0.5 cos 100, 0.5 cos 10;  phi: 0.5 (cos 400 - 4), 0.5 cos 40
    c = math.cos
    r = math.radians
    expected_cos = [[math.sqrt(3), 1.0], [0.5 * c(r(100)), 0.5 * c(r(10))]]
    expected_phi = [[-1.0, -3.0], [0.5 * (c(r(40)) - 4), 0.5 * c(r(40))]]
    torch.testing.assert_close(cos, torch.tensor(expected_cos, dtype=torch.float64))
    torch.testing.assert_close(phi, torch.tensor(expected_phi, dtype=torch.float64))


def test_phi_decreases_monotonically_over_zero_to_pi():
    layer = AngleLinear(2, 1, m=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0]]))
    angles = torch.linspace(0.5, 179.5, 359)
    x = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1)
    with torch.no_grad():
        _, phi = layer(x)
    assert (phi[1:, 0] < phi[:-1, 0]).all()
    assert phi[-1, 0].item() == pytest.approx(-7.0, abs=1e-2)  # (-1)^3 cos(4 pi) - 2 * 3 at theta -> pi


def test_angle_lambda_schedule():
    assert angle_lambda(1) == pytest.approx(1500 / 1.1)
    assert angle_lambda(290) == pytest.approx(50.0)
    assert angle_lambda(2990) == pytest.approx(5.0)
    assert angle_lambda(100_000) == 5.0  # floored at 5


def test_angle_loss_by_hand():
    cos = torch.tensor([[1.0, 0.5], [0.2, 0.4]], dtype=torch.float64)
    phi = torch.tensor([[-1.0, -3.0], [-2.0, 0.1]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    # iteration 2990: lambda = 5; the target logit is cos - cos / 6 + phi / 6
    #   sample 0: logits (1 - 1/6 - 1/6, 0.5) = (2/3, 1/2);  sample 1: (0.2, 0.4 - 0.4/6 + 0.1/6) = (0.2, 0.35)
    logits = angle_logits(cos, phi, target, 2990)
    torch.testing.assert_close(logits, torch.tensor([[2 / 3, 0.5], [0.2, 0.35]], dtype=torch.float64))
    expected = (math.log(1 + math.exp(0.5 - 2 / 3)) + math.log(1 + math.exp(0.2 - 0.35))) / 2
    assert angle_loss((cos, phi), target, 2990).item() == pytest.approx(expected)
    # iteration 1: lambda = 1500 / 1.1, the target logit barely moves from cos
    lam = 1500 / 1.1
    first = angle_logits(cos, phi, target, 1)
    assert first[0, 0].item() == pytest.approx(1.0 + (-1.0 - 1.0) / (1 + lam))
    assert first[0, 1].item() == 0.5 and first[1, 0].item() == pytest.approx(0.2)


def test_face_head_embeds_then_classifies_by_angle():
    torch.manual_seed(0)
    head = FaceHead(12, 5, embedding=4)
    assert head.embedding.weight.shape == (4, 12) and head.angle.weight.shape == (5, 4)
    assert head.embedding.bias.abs().sum() == 0 and head.embedding.weight.std() < 0.02  # CPG: N(0, 0.01), bias 0
    x = torch.randn(3, 12)
    embedding = head.embed(x)
    cos, phi = head.angular(x)
    torch.testing.assert_close(head(x), cos)
    expected = embedding @ torch.nn.functional.normalize(head.angle.weight, dim=1).t()
    torch.testing.assert_close(cos, expected)
    assert head.out_features == 5 and phi.shape == (3, 5)


# ---- class weights -----------------------------------------------------------------------------------------------


def test_class_weights_by_hand():
    torch.testing.assert_close(class_weights([1, 3]), torch.tensor([3.0, 1 / 3]))
    affectnet = [74874, 134415, 25459, 14090, 6378, 3803, 24882]  # CPG's utils/manager.py; N = 283901
    weights = class_weights(affectnet)
    assert weights[0].item() == pytest.approx(209027 / 74874)
    assert weights[5].item() == pytest.approx(280098 / 3803)
    with pytest.raises(ValueError, match="positive"):
        class_weights([3, 0])


# ---- LFW verification --------------------------------------------------------------------------------------------


def test_verification_folds_are_contiguous_tenths():
    assert np.bincount(verification_folds(6000)).tolist() == [600] * 10
    folds = verification_folds(23)
    assert np.bincount(folds).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert (np.diff(folds) >= 0).all()
    with pytest.raises(ValueError):
        verification_folds(5, 10)


def fold_pairs(same_sims, different_sims, folds: int = 10):
    """Per fold the same pairs then the different ones, as LFW's pairs.txt orders them."""
    similarity, same = [], []
    for k in range(folds):
        similarity += list(same_sims(k)) + list(different_sims(k))
        same += [True] * len(same_sims(k)) + [False] * len(different_sims(k))
    return np.array(similarity), np.array(same)


def test_separable_similarities_score_one():
    similarity, same = fold_pairs(lambda k: [0.9, 0.8, 0.7], lambda k: [0.1, -0.3, 0.2])
    mean, std, accuracies = verification_accuracy(similarity, same)
    assert (mean, std) == (1.0, 0.0) and accuracies.tolist() == [1.0] * 10


def test_a_known_number_of_errors_per_fold():
    # fold k: 5 same and 5 different pairs (at 0.1); errors[k] of its same pairs sit at -0.5 (distance 2), the others
    # at 0.9: only a threshold above 2 would accept them, misclassifying every different pair, so they stay wrong
    errors = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    similarity, same = fold_pairs(lambda k: [0.9] * (5 - errors[k]) + [-0.5] * errors[k], lambda k: [0.1] * 5)
    mean, std, accuracies = verification_accuracy(similarity, same, n_folds=10)
    expected = np.array([1 - e / 10 for e in errors])
    np.testing.assert_allclose(accuracies, expected)
    assert mean == pytest.approx(expected.mean()) and std == pytest.approx(expected.std())


def test_the_threshold_comes_from_the_other_folds():
    # fold 0 alone would need a threshold between distance(0.5) = 1.333 and distance(0.3) = 1.612; the nine others
    # need one between distance(0.9) = 0.574 and distance(0.6) = 1.181, and outvote it: fold 0 keeps its different
    # pairs right and its same pairs wrong (0.5); every other fold, trained with fold 0 among its nine, scores 1.0
    def same_sims(k):
        return [0.5] * 5 if k == 0 else [0.9] * 5

    def different_sims(k):
        return [0.3] * 5 if k == 0 else [0.6] * 5

    mean, std, accuracies = verification_accuracy(*fold_pairs(same_sims, different_sims))
    assert accuracies.tolist() == [0.5] + [1.0] * 9
    assert mean == pytest.approx(0.95) and std == pytest.approx(0.15)
