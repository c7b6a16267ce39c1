"""The KTO metric sums with hand-computed numbers written out: both classes, one class, a rank without
rows. The same definitions serve the training step, eval during training and `kto-ray evaluate`."""

import pytest
import torch

from kto_ray.objective import EVAL_KEYS, TRAIN_KEYS, KTOLossOutput, KTOSums
from kto_ray.training.distributed import global_kl

# Three rows, beta = 0.5: policy [-1, -3, -2], reference [-2, -2, -2], so r = [1, -1, 0] and the
# rewards beta * r = [0.5, -0.5, 0]. Rows 0 and 2 are desirable. The losses are written out by hand
# (the sums do not depend on where they come from): [0.25, 0.5, 0.75].
POLICY = torch.tensor([-1.0, -3.0, -2.0])
REF = torch.tensor([-2.0, -2.0, -2.0])
DESIRABLE = torch.tensor([True, False, True])
OUT = KTOLossOutput(
    losses=torch.tensor([0.25, 0.5, 0.75]), loss=torch.tensor(0.5), rewards=torch.tensor([0.5, -0.5, 0.0])
)
# At z0 = 0: row 0 has r - z0 = 1 > 0 (counts 1), row 1 z0 - r = 1 > 0 (1), row 2 r - z0 = 0 (a tie: 0.5).
BOTH_CLASSES = {
    "rows": 3,
    "loss": (0.25 + 0.5 + 0.75) / 3,  # 0.5
    "kl": 0.0,
    "kl/raw": 0.0,  # to_metrics(0.0) without kl_raw: z0's value
    "reward_accuracy": (1 + 1 + 0.5) / 3,
    "rewards/chosen": (0.5 + 0.0) / 2,  # 0.25
    "rewards/rejected": -0.5,
    "rewards/margins": 0.25 - -0.5,  # 0.75
    "logps/chosen": (-1.0 + -2.0) / 2,  # -1.5
    "logps/rejected": -3.0,
    "logps/margin": -1.5 - -3.0,  # 1.5
}


def _both_classes() -> KTOSums:
    sums = KTOSums.zeros()
    sums.add(OUT, POLICY, REF, DESIRABLE, 0.0, tokens=12)
    return sums


def test_both_classes_hand_computed():
    sums = _both_classes()
    assert sums.to_metrics(0.0) == pytest.approx(BOTH_CLASSES)
    assert list(sums.to_metrics(0.0)) == list(EVAL_KEYS)
    train = sums.to_metrics(0.0, TRAIN_KEYS, grad_norm=2.5)
    assert list(train) == list(TRAIN_KEYS)
    assert train["count/chosen"] == 2 and train["count/rejected"] == 1
    assert train["tokens"] == 12 and train["rows"] == 3 and train["grad_norm"] == 2.5
    assert train["rewards/margins"] == pytest.approx(0.75)


def test_accuracy_is_measured_against_z0():
    # z0 = 0.5: row 0 r - z0 = 0.5 > 0 (1), row 1 z0 - r = 1.5 > 0 (1), row 2 r - z0 = -0.5 (0).
    sums = KTOSums.zeros()
    sums.add(OUT, POLICY, REF, DESIRABLE, torch.tensor(0.5))
    assert sums.to_metrics(0.5)["reward_accuracy"] == pytest.approx(2 / 3)


def test_micro_batches_add_up_to_the_whole_batch():
    sums = KTOSums.zeros()
    for rows in ([0], [1, 2]):
        i = torch.tensor(rows)
        part = KTOLossOutput(OUT.losses[i], OUT.losses[i].mean(), OUT.rewards[i])
        sums.add(part, POLICY[i], REF[i], DESIRABLE[i], 0.0, tokens=6)
    assert sums.to_metrics(0.0, TRAIN_KEYS, grad_norm=0.0) == _both_classes().to_metrics(
        0.0, TRAIN_KEYS, grad_norm=0.0
    )


@pytest.mark.parametrize("desirable", [True, False])
def test_one_class_batch_has_zero_for_the_absent_class_and_both_margins(desirable):
    # Two rows of one class: policy [-1, -2], reference [-2, -2], r = [1, 0], rewards [0.5, 0],
    # losses [0.25, 0.75], z0 = 0.5. Desirable: r - z0 = [0.5, -0.5]; undesirable: z0 - r = [-0.5, 0.5].
    # Either way one row of two counts: accuracy 0.5.
    out = KTOLossOutput(torch.tensor([0.25, 0.75]), torch.tensor(0.5), torch.tensor([0.5, 0.0]))
    sums = KTOSums.zeros()
    sums.add(out, torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([desirable] * 2), 0.5)
    present, absent = ("chosen", "rejected") if desirable else ("rejected", "chosen")
    metrics = sums.to_metrics(0.5, (*EVAL_KEYS, "count/chosen", "count/rejected"))
    assert metrics == pytest.approx(
        {
            "rows": 2,
            "loss": 0.5,
            "kl": 0.5,
            "kl/raw": 0.5,
            "reward_accuracy": 0.5,
            f"rewards/{present}": (0.5 + 0.0) / 2,
            f"rewards/{absent}": 0.0,
            "rewards/margins": 0.0,  # not 0.25 - 0: a margin against an absent class means nothing
            f"logps/{present}": (-1.0 + -2.0) / 2,
            f"logps/{absent}": 0.0,
            "logps/margin": 0.0,
            f"count/{present}": 2,
            f"count/{absent}": 0,
        }
    )


def _add_no_rows(sums: KTOSums, z0: torch.Tensor | float) -> None:
    empty = torch.zeros(0)
    sums.add(KTOLossOutput(empty, torch.tensor(0.0), empty), empty, empty, empty.bool(), z0)


def test_empty_batch_gives_zeros_not_nan():
    sums = KTOSums.zeros()
    _add_no_rows(sums, 0.0)
    metrics = sums.to_metrics(0.0, TRAIN_KEYS, grad_norm=0.0)
    assert metrics == {key: 0 for key in TRAIN_KEYS}


def _two_ranks(other: torch.Tensor, calls: list):
    """The all-reduce (a sum) of a 2-rank world, seen from the rank holding the argument."""

    def reduce(local: torch.Tensor) -> torch.Tensor:
        calls.append(local.shape)
        return local + other

    return reduce


def test_a_rank_without_rows_leaves_the_global_metrics_and_z0_unchanged():
    # Rank 0 holds the three rows, with KL log-ratios summing to 1.5 (z0 = 1.5 / 3 = 0.5); rank 1 none.
    calls = []
    z0, raw, count = global_kl(torch.tensor(1.5), 3, _two_ranks(torch.zeros(2), calls))
    assert (z0.item(), raw.item(), count.item()) == (0.5, 0.5, 3.0)
    # Seen from rank 1: its zeros plus rank 0's [1.5, 3] give the same z0.
    z0_1, raw_1, count_1 = global_kl(torch.zeros(()), 0, _two_ranks(torch.tensor([1.5, 3.0]), calls))
    assert (z0_1.item(), raw_1.item(), count_1.item()) == (0.5, 0.5, 3.0)

    rank_0, rank_1 = _both_classes(), KTOSums.zeros()
    _add_no_rows(rank_1, z0_1)
    from_0 = rank_0.reduce(_two_ranks(rank_1.stacked(), calls)).to_metrics(0.0)
    from_1 = rank_1.reduce(_two_ranks(rank_0.stacked(), calls)).to_metrics(0.0)
    assert from_0 == from_1 == pytest.approx(BOTH_CLASSES)
    assert calls == [torch.Size([2])] * 2 + [torch.Size([len(rank_0.stacked())])] * 2  # one call each


def test_z0_is_clamped_and_an_empty_world_gives_zero():
    # A negative mean log-ratio is clamped to 0 (the paper's max(0, .)), and the raw estimate keeps it:
    # -6 / 4 = -1.5. No KL pairs anywhere gives 0 for both.
    z0, raw, count = global_kl(torch.tensor(-6.0), 4, lambda t: t)
    assert (z0.item(), raw.item(), count.item()) == (0.0, -1.5, 4.0)
    z0, raw, count = global_kl(torch.zeros(()), 0, lambda t: t)
    assert (z0.item(), raw.item(), count.item()) == (0.0, 0.0, 0.0)


def test_metrics_carry_the_raw_estimate_beside_the_clamped_z0():
    metrics = _both_classes().to_metrics(0.0, TRAIN_KEYS, kl_raw=-1.5, grad_norm=0.0)
    assert (metrics["kl"], metrics["kl/raw"]) == (0.0, -1.5)
    assert list(metrics)[:3] == ["loss", "kl", "kl/raw"]
    assert _both_classes().to_metrics(0.25)["kl/raw"] == 0.25  # not given: z0 itself
