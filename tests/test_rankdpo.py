"""RankDPO and the reward vote aggregation: hand-derived numbers and the k=2 reduction."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.objectives import diffusion_dpo_loss, rank_dpo_loss
from diffalign.rewards.ensemble import normalise, ranks_from_phi, vote_phi, weighted_sum


def test_vote_phi_hand_computed_with_ties():
    """R1 = [3,1,2]: wins [2,0,1]; R2 = [1,1,5]: the 1-1 tie gives nobody a vote, wins [0,0,2].
    C = [2,0,3]; phi = C / (n(k-1)) = C / 4 = [0.5, 0, 0.75]; ranks [2,3,1]."""
    phi = vote_phi({"r1": torch.tensor([[3.0, 1, 2]]), "r2": torch.tensor([[1.0, 1, 5]])})
    assert phi.tolist() == [[0.5, 0.0, 0.75]]
    assert ranks_from_phi(phi).tolist() == [[2, 3, 1]]
    # all tied: no votes at all, ranks fall back to index order
    tied = vote_phi({"r": torch.ones(1, 3)})
    assert tied.tolist() == [[0.0, 0.0, 0.0]] and ranks_from_phi(tied).tolist() == [[1, 2, 3]]


def test_vote_phi_weighted_hand_computed():
    """Same scores as above, weights (3, 1): C = 3*[2,0,1] + 1*[0,0,2] = [6,0,5];
    phi = C / (sum(w) (k-1)) = C / 8 = [0.75, 0, 0.625]: now image 0 ranks first (R1 outvotes R2)."""
    scores = {"r1": torch.tensor([[3.0, 1, 2]]), "r2": torch.tensor([[1.0, 1, 5]])}
    phi = vote_phi(scores, [3.0, 1.0])
    assert phi.tolist() == [[0.75, 0.0, 0.625]]
    assert ranks_from_phi(phi).tolist() == [[1, 3, 2]]
    assert torch.equal(vote_phi(scores, [2.0, 2.0]), vote_phi(scores))  # equal weights = the paper's vote
    assert torch.equal(
        vote_phi(scores, [1.0, 0.0]), vote_phi({"r1": scores["r1"]})
    )  # weight 0 drops a reward
    with pytest.raises(ValueError, match="1 weight"):
        vote_phi(scores, [1.0])
    with pytest.raises(ValueError, match="must be >= 0"):
        vote_phi(scores, [1.0, -1.0])


def test_vote_phi_is_scale_invariant():
    s = torch.randn(5, 4)
    assert torch.equal(vote_phi({"a": s, "b": s * 100 + 7}), vote_phi({"a": s}))


def test_normalised_weighted_sum():
    a = torch.tensor([[1.0, 3.0], [10.0, 30.0]])
    g = normalise(a, "group")
    assert torch.allclose(g, torch.tensor([[-0.70710678, 0.70710678]] * 2))
    assert torch.allclose(weighted_sum({"a": a, "b": -a}, {"a": 2.0, "b": 1.0}, "group"), g)
    with pytest.raises(ValueError, match="weights missing"):
        weighted_sum({"a": a}, {"b": 1.0})


def test_rankdpo_k2_is_dpo_with_gain():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.rand(16, generator=g, dtype=torch.float64) * 0.2 for _ in range(4))
    beta = 300.0
    phi = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(16, 2)
    rank = torch.tensor([[1, 2]]).expand(16, 2)
    loss, _ = rank_dpo_loss(torch.stack([pw, pl], 1), torch.stack([rw, rl], 1), phi, rank, beta)
    dpo, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta)
    w = 1.0 * (1 / math.log(2) - 1 / math.log(3))  # |G_1 - G_2| = 1, discount gap 0.532456
    assert w == pytest.approx(0.532456, abs=1e-6)
    assert torch.allclose(loss, w * dpo, atol=1e-9)


def test_rankdpo_k3_hand_derived():
    """phi = [1, .5, 0] -> gains [1, 0.414214, 0]; 1/log(1+rank) = [1.442695, 0.910239, 0.721348]
    w01 = 0.585786 * 0.532456 = 0.311906; w02 = 1 * 0.721348; w12 = 0.414214 * 0.188891 = 0.078241
    with s = 0 every pair costs ln 2: loss = (0.311906 + 0.721348 + 0.078241) * 0.693147 / 3 = 0.256812"""
    z = torch.zeros(1, 3, dtype=torch.float64)
    phi = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    loss, _ = rank_dpo_loss(z, z, phi, torch.tensor([[1, 2, 3]]), beta=100.0)
    assert loss.item() == pytest.approx(0.256812, abs=1e-5)


def test_rankdpo_prefers_right_order():
    """Policy error lowered on the best image and raised on the worst: lower loss than the reverse."""
    ref = torch.full((1, 3), 0.1)
    phi, rank = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[1, 2, 3]])
    good, _ = rank_dpo_loss(ref + torch.tensor([[-0.01, 0.0, 0.01]]), ref, phi, rank, beta=100.0)
    bad, _ = rank_dpo_loss(ref + torch.tensor([[0.01, 0.0, -0.01]]), ref, phi, rank, beta=100.0)
    assert good.item() < bad.item()
