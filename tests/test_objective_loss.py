"""KTO loss numbers computed by hand and written out, plus a cross-check against the paper's formula."""

import math

import pytest
import torch

from kto_ray.objective import completion_logps, kl_raw, kto_loss, mean_from_sum


def test_kto_loss_hand_computed_numbers():
    # r = [-10 - -11, -12 - -11] = [1, -1]; z0 = 0.5; beta = 0.1
    # desirable row:   1 - sigmoid(0.1 * (1 - 0.5))    = 1 - sigmoid(0.05) = 0.4875026035157897
    # undesirable row: 1 - sigmoid(0.1 * (0.5 - -1))   = 1 - sigmoid(0.15) = 0.4625701546562504
    out = kto_loss(
        torch.tensor([-10.0, -12.0]),
        torch.tensor([-11.0, -11.0]),
        torch.tensor([True, False]),
        torch.tensor(0.5),
        beta=0.1,
    )
    torch.testing.assert_close(out.losses, torch.tensor([0.4875026035157897, 0.4625701546562504]))
    torch.testing.assert_close(out.loss, torch.tensor(0.47503637908602))
    torch.testing.assert_close(out.rewards, torch.tensor([0.1, -0.1]))


def test_kto_loss_weights_apply_to_their_own_class():
    # lambda_D = 2 scales the desirable row, lambda_U = 1.5 the undesirable one (not swapped).
    out = kto_loss(
        torch.tensor([-10.0, -12.0]),
        torch.tensor([-11.0, -11.0]),
        torch.tensor([True, False]),
        0.5,
        beta=0.1,
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    torch.testing.assert_close(out.losses, torch.tensor([0.9750052070315794, 0.6938552319843756]))


def test_kto_loss_at_reference_is_half_per_row():
    # policy == reference and z0 = 0: every row loses lambda * (1 - sigmoid(0)) = lambda / 2.
    logps = torch.tensor([-3.0, -4.0, -5.0])
    out = kto_loss(logps, logps, torch.tensor([True, False, True]), 0.0, beta=0.1, desirable_weight=1.2)
    torch.testing.assert_close(out.losses, torch.tensor([0.6, 0.5, 0.6]))
    torch.testing.assert_close(out.rewards, torch.zeros(3))


@pytest.mark.parametrize("labels", [[True, True], [False, False], []])
def test_one_class_and_empty_batches_are_finite(labels):
    n = len(labels)
    policy = torch.randn(n, requires_grad=True)
    out = kto_loss(policy, torch.randn(n), torch.tensor(labels, dtype=torch.bool), 0.3, beta=0.1)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(policy.grad).all()


def test_gradient_of_desirable_row_pushes_logp_up_and_undesirable_down():
    policy = torch.tensor([-10.0, -10.0], requires_grad=True)
    out = kto_loss(policy, torch.tensor([-10.0, -10.0]), torch.tensor([True, False]), 0.0, beta=0.1)
    out.loss.backward()
    # d/dr [1 - sigmoid(beta r)] / 2 = -beta * s(1-s) / 2 = -0.1 * 0.25 / 2 = -0.0125
    torch.testing.assert_close(policy.grad, torch.tensor([-0.0125, 0.0125]))


def test_the_kl_estimate_is_detached_and_unclamped():
    # The clamp to z0 = max(0, .) is global_kl's (tests/test_objective_metrics.py, where -1.5 gives 0).
    policy_kl = torch.tensor([-5.0, -6.0], requires_grad=True)
    raw = kl_raw(policy_kl, torch.tensor([-6.0, -6.5]))
    torch.testing.assert_close(raw, torch.tensor(0.75))  # mean of [1.0, 0.5]
    assert not raw.requires_grad
    assert kl_raw(torch.tensor([-7.0, -5.0]), torch.tensor([-6.0, -3.0])).item() == -1.5  # [-1, -2]
    assert kl_raw(torch.tensor([]), torch.tensor([])).item() == 0.0
    torch.testing.assert_close(mean_from_sum(torch.tensor(3.0), 4), torch.tensor(0.75))


def test_completion_logps_hand_computed():
    # Uniform logits over 3 tokens: each completion token has log-prob -log 3.
    input_ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    logits = torch.zeros(2, 4, 3)
    out = completion_logps(logits, input_ids, mask)
    torch.testing.assert_close(out, torch.tensor([-2 * math.log(3), -math.log(3)]))


def test_completion_logps_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack(
        [sum(logp[b, t - 1, ids[b, t]] for t in range(1, 7) if mask[b, t]) for b in range(3)]
    )
    torch.testing.assert_close(completion_logps(logits, ids, mask), expected)


def _paper_loss(policy, ref, desirable, kl_policy, kl_ref, beta, lam_d, lam_u):
    """Direct transcription of Ethayarajh et al. (2024), eq. 8, one row at a time, in float64."""
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_ref)) / len(kl_policy))
    total = 0.0
    for p, r, d in zip(policy, ref, desirable):
        reward = p - r
        if d:
            total += lam_d * (1 - 1 / (1 + math.exp(-beta * (reward - z0))))
        else:
            total += lam_u * (1 - 1 / (1 + math.exp(-beta * (z0 - reward))))
    return total / len(policy)


@pytest.mark.parametrize("seed", range(5))
def test_matches_paper_formula_on_random_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 16
    policy, ref = -20 * torch.rand(n, generator=gen), -20 * torch.rand(n, generator=gen)
    kl_policy, kl_ref = -20 * torch.rand(n, generator=gen), -20 * torch.rand(n, generator=gen) - 3
    desirable = torch.rand(n, generator=gen) > 0.4
    out = kto_loss(
        policy,
        ref,
        desirable,
        kl_raw(kl_policy, kl_ref).clamp(min=0.0),
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.9,
    )
    expected = _paper_loss(
        policy.tolist(), ref.tolist(), desirable.tolist(), kl_policy.tolist(), kl_ref.tolist(), 0.3, 1.3, 0.9
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
