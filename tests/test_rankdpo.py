"""RankDPO and the reward vote aggregation: hand-derived numbers, the paper's literal formula, the
k=2 reduction to the official DPO line, ranks derived from phi, and order-independent ties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import RankDPO, rank_dpo_loss
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


def _paper_rankdpo(policy_err, ref_err, phi, rank, beta_paper):
    """arXiv 2410.18013v2 Eq. 5-7 written out literally for one prompt (no diffalign code):
    L = -sum_{i above j} Delta_ij * log sigmoid(-beta_paper * (s_i - s_j)),
    s_i = err_theta - err_ref, G_i = 2^phi_i - 1, D(r) = log(1 + r),
    Delta_ij = |G_i - G_j| |1/D_i - 1/D_j|."""
    k = len(phi)
    s = [policy_err[i] - ref_err[i] for i in range(k)]
    loss = 0.0
    for i in range(k):
        for j in range(k):
            if rank[i] < rank[j]:
                delta = abs((2 ** phi[i] - 1) - (2 ** phi[j] - 1)) * abs(
                    1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j])
                )
                loss -= delta * math.log(1 / (1 + math.exp(beta_paper * (s[i] - s[j]))))
    return loss


def test_rankdpo_k2_is_the_official_dpo_line_times_the_gain_weight():
    """k = 2: RankDPO = Diffusion-DPO's official line (restated, not diffalign's function) times the
    constant weight |G_1 - G_2| (1/log 2 - 1/log 3) = 1 * 0.532456 (paper App. A.2)."""
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.rand(16, generator=g, dtype=torch.float64) * 0.2 for _ in range(4))
    beta = 300.0
    out = RankDPO(beta=beta)(torch.stack([pw, pl], 1), torch.stack([rw, rl], 1), {})
    official = -F.logsigmoid(-0.5 * beta * ((pw - pl) - (rw - rl)))  # Salesforce train.py:1125-1146
    w = 1 / math.log(2) - 1 / math.log(3)
    assert w == pytest.approx(0.532456, abs=1e-6)
    torch.testing.assert_close(out.loss, w * official)
    torch.testing.assert_close(out.metrics["margin"], -0.5 * beta * ((pw - pl) - (rw - rl)))  # the DPO logit


def test_rankdpo_k3_hand_derived_with_nonzero_scores():
    """phi = [1, .5, 0], ranks [1, 2, 3]: gains [1, 0.4142136, 0];
    1/log(1+rank) = [1.4426950, 0.9102392, 0.7213475]
    w01 = 0.5857864 * 0.5324558 = 0.3119054; w02 = 1 * 0.7213475; w12 = 0.4142136 * 0.1888917 = 0.0782415.
    s = policy - ref = [-0.002, 0, 0.001], beta 1000 (inside = -500 (s_i - s_j)):
    inside01 = 1.0 -> -logsig = 0.3132617; inside02 = 1.5 -> 0.2014133; inside12 = 0.5 -> 0.4740770
    loss = (0.3119054*0.3132617 + 0.7213475*0.2014133 + 0.0782415*0.4740770) / 3 = 0.0933632
    gradient factor F = (0.3119054*0.2689414 + 0.7213475*0.1824255 + 0.0782415*0.3775407) / 1.1114944
      = 0.2204382 -> margin = log((1 - F) / F) = 1.2631146; every pair is won: accuracy 1."""
    ref = torch.tensor([[0.100, 0.110, 0.120]], dtype=torch.float64)
    pol = ref + torch.tensor([[-0.002, 0.0, 0.001]], dtype=torch.float64)
    phi = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    out = RankDPO(beta=1000.0)(
        pol.clone().requires_grad_(True), ref, {"phi": phi, "rank": torch.tensor([[1, 2, 3]])}
    )
    assert out.loss.item() == pytest.approx(0.0933632, abs=1e-6)
    assert out.metrics["margin"].item() == pytest.approx(1.2631146, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0
    # the paper's literal formula with beta_paper = beta / 2, summed over pairs = ours * k(k-1)/2
    paper = _paper_rankdpo(pol[0].tolist(), ref[0].tolist(), [1.0, 0.5, 0.0], [1, 2, 3], beta_paper=500.0)
    assert out.loss.item() * 3 == pytest.approx(paper, rel=1e-9)
    # the reversed policy (worst image improved most) costs more
    rev = RankDPO(beta=1000.0)(ref - (pol - ref), ref, {"phi": phi})
    assert rev.loss.item() > out.loss.item() and rev.metrics["margin"].item() < 0


def test_rankdpo_derives_ranks_from_phi_not_the_rank_column():
    """A stored rank that contradicts phi (here: reversed) must not flip the training direction."""
    ref = torch.tensor([[0.100, 0.110, 0.120]])
    pol = ref + torch.tensor([[-0.002, 0.0, 0.001]])
    phi = torch.tensor([[1.0, 0.5, 0.0]])
    good = RankDPO(beta=1000.0)(pol, ref, {"phi": phi, "rank": torch.tensor([[1, 2, 3]])})
    contradicting = RankDPO(beta=1000.0)(pol, ref, {"phi": phi, "rank": torch.tensor([[3, 2, 1]])})
    assert contradicting.loss.item() == pytest.approx(0.0933632, abs=1e-6)
    torch.testing.assert_close(contradicting.loss, good.loss)


def test_rankdpo_ties_share_the_average_rank_and_are_order_independent():
    """phi = [0.75, 0.5, 0.5, 0]: images 1 and 2 tie and share rank (2 + 3) / 2 = 2.5.
    gains [0.6817928, 0.4142136, 0.4142136, 0]; 1/log(1+rank) = [1.4426950, 0.7982356, 0.7982356, 0.6213349]
    pairs (the tied pair 1-2 has none): w01 = w02 = 0.2675792 * 0.6444594 = 0.1724440,
    w03 = 0.6817928 * 0.8213601 = 0.5599974, w13 = w23 = 0.4142136 * 0.1769007 = 0.0732747.
    s = [-0.001, 0.0005, 0.002, 0.001], beta 1000: insides 0.75, 1.5, 1.0, 0.25, -0.5 ->
    -logsig 0.3868710, 0.2014133, 0.3132617, 0.5759394, 0.9740770;
    loss = (0.1724440 (0.3868710 + 0.2014133) + 0.5599974 * 0.3132617 + 0.0732747 (0.5759394 + 0.9740770)) / 6
         = 0.0650748"""
    ref = torch.full((1, 4), 0.1, dtype=torch.float64)
    s = torch.tensor([[-0.001, 0.0005, 0.002, 0.001]], dtype=torch.float64)
    phi = torch.tensor([[0.75, 0.5, 0.5, 0.0]], dtype=torch.float64)
    obj = RankDPO(beta=1000.0)
    out = obj(ref + s, ref, {"phi": phi, "rank": ranks_from_phi(phi)})
    assert out.loss.item() == pytest.approx(0.0650748, abs=1e-6)
    swap = [0, 2, 1, 3]  # the tied images in the other order (a stable sort would swap their ranks)
    out2 = obj((ref + s)[:, swap], ref[:, swap], {"phi": phi[:, swap], "rank": ranks_from_phi(phi[:, swap])})
    assert out2.loss.item() == out.loss.item()
    # all tied: nothing to prefer, zero loss and a neutral margin
    flat = obj(ref + s, ref, {"phi": torch.full((1, 4), 0.5, dtype=torch.float64)})
    assert flat.loss.item() == 0.0 and flat.metrics["margin"].item() == 0.0


def test_rankdpo_reports_best_and_worst_errors():
    pol = torch.tensor([[0.3, 0.1, 0.2]])
    ref = torch.tensor([[0.31, 0.11, 0.21]])
    out = RankDPO()(pol, ref, {"phi": torch.tensor([[0.5, 1.0, 0.0]])})  # best = image 1, worst = image 2
    assert out.metrics["err/policy_w"].item() == pytest.approx(0.1)
    assert out.metrics["err/ref_w"].item() == pytest.approx(0.11)
    assert out.metrics["err/policy_l"].item() == pytest.approx(0.2)
    assert out.metrics["err/ref_l"].item() == pytest.approx(0.21)


def test_rankdpo_prefers_right_order():
    """Policy error lowered on the best image and raised on the worst: lower loss than the reverse."""
    ref = torch.full((1, 3), 0.1)
    phi = torch.tensor([[1.0, 0.5, 0.0]])
    good, _, _ = rank_dpo_loss(ref + torch.tensor([[-0.01, 0.0, 0.01]]), ref, phi, beta=100.0)
    bad, _, _ = rank_dpo_loss(ref + torch.tensor([[0.01, 0.0, -0.01]]), ref, phi, beta=100.0)
    assert good.item() < bad.item()
