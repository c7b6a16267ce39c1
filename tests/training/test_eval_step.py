"""Eval during training with stand-ins (a plain module, gloo process groups): no Ray, no DeepSpeed.

The split sizes are chosen so the shards are uneven (9 rows over 2 ranks x micro-batch 4: one rank runs a
dummy micro-batch) and so that one rank has no row at all (1 row over 2 ranks): the 2-rank metrics must
equal the 1-rank ones, and every rank must have run the same number of forwards (ZeRO-3 hangs otherwise).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.objective import kl_raw, kto_loss
from kto_ray.training.distributed import all_reduce_sum
from kto_ray.training.eval_step import eval_metrics, most_batches, shard_batches
from tests.training.test_step import SETTINGS, _model, _table

CASES = {"uneven": 9, "one-row": 1, "even": 8}


def _eval(rows: int, rank: int, world: int, reduce=lambda t: t) -> tuple[dict, int]:
    """The metrics and the number of forwards this rank ran."""
    model = _model()
    forwards = []
    # The decoder, not the LM: chunked log-probs call the decoder and the head, not model.forward.
    model.get_decoder().register_forward_hook(lambda *_: forwards.append(1))
    metrics = eval_metrics(model, _table(rows), rank, world, 4, 0, SETTINGS, reduce)
    assert model.training  # the mode is restored for the next training step
    return metrics, len(forwards)


def _worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for case, rows in CASES.items():
            out[(case, rank)] = _eval(rows, rank, 2, all_reduce_sum)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = tmp_path_factory.mktemp("pg") / "init"
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(str(init_file), out), nprocs=2, start_method="spawn")
        return dict(out)


def test_shards_cover_every_row_once_and_the_largest_bounds_the_batch_count():
    lengths = np.array([5, 9, 2, 7, 7, 1, 3, 8, 4])
    shards = [shard_batches(rank, 2, 4, lengths) for rank in (0, 1)]
    # Longest first, dealt out: rank 0 gets 9, 7, 5, 3, 1 (rows 1, 3, 0, 6, 5), rank 1 gets 8, 7, 4, 2.
    assert [b.tolist() for b in shards[0]] == [[1, 3, 0, 6], [5]]
    assert [b.tolist() for b in shards[1]] == [[7, 4, 8, 2]]  # one fewer: it runs one filler
    assert most_batches(9, 2, 4) == 2
    rows = np.concatenate([b for s in shards for b in s])
    assert sorted(rows.tolist()) == list(range(9))
    assert [len(shard_batches(rank, 2, 4, lengths[:1])) for rank in (0, 1)] == [1, 0]
    assert most_batches(1, 2, 4) == 1


def test_one_rank_matches_the_loss_module_on_the_whole_split():
    table = _table(9)
    metrics, _ = _eval(9, 0, 1)
    part = table.to_pydict()
    model = _model().eval()
    with torch.no_grad():
        policy = sequence_logps(model, pad_sequences(part["prompt_ids"], part["completion_ids"], 0))
        policy_kl = sequence_logps(model, pad_sequences(part["prompt_ids"], part["kl_completion_ids"], 0))
    ref, desirable = torch.tensor(part["ref_logps"]), torch.tensor(part["label"])
    z0 = kl_raw(policy_kl, torch.tensor(part["ref_kl_logps"])).clamp(min=0.0)
    expected = kto_loss(policy, ref, desirable, z0, beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)
    assert z0.item() > 0  # random weights vs random reference log-probs: the clamp is not hiding z0
    assert metrics["rows"] == 9
    assert metrics["kl"] == pytest.approx(z0.item(), abs=1e-5)
    assert metrics["loss"] == pytest.approx(expected.loss.item(), abs=1e-5)
    chosen = expected.rewards[desirable].mean() - expected.rewards[~desirable].mean()
    assert metrics["rewards/margins"] == pytest.approx(chosen.item(), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(policy[desirable].mean().item(), abs=1e-4)
    signed = torch.where(desirable, policy - ref - z0, z0 - (policy - ref))
    assert metrics["reward_accuracy"] == pytest.approx((signed > 0).float().mean().item())


def test_eval_calls_the_same_three_collectives_on_a_rank_with_rows_and_one_without():
    # 1 row over 2 ranks: the micro-batch counts (a histogram over 0..1, `distributed.evened_out`),
    # [KL sum, count] for z0, then the metric sums, on both ranks alike.
    calls = {0: [], 1: []}
    for rank in calls:
        eval_metrics(
            _model(), _table(1), rank, 2, 4, 0, SETTINGS, lambda t, c=calls[rank]: c.append(t.shape) or t
        )
    assert calls[0] == calls[1]
    assert len(calls[0]) == 3 and calls[0][:2] == [(2,), (2,)] and calls[0][2][0] > 2


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_rank_with_the_same_number_of_forwards(two_rank_results, case):
    one, _ = _eval(CASES[case], 0, 1)
    (two, forwards_0), (two_1, forwards_1) = two_rank_results[(case, 0)], two_rank_results[(case, 1)]
    assert forwards_0 == forwards_1 > 0
    assert two == two_1  # every rank gets the global metrics
    assert two.keys() == one.keys()
    assert two["rows"] == one["rows"] == CASES[case]
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_eval_every_without_an_eval_split_is_refused_before_training(tiny_model, small_data, tmp_path):
    from kto_ray.errors import UserError
    from kto_ray.training.launch.driver import train
    from tests.conftest import make_config

    # Online reference: the driver only tokenizes (no store, no Ray) before it checks.
    cfg = make_config(
        tiny_model,
        small_data,
        tmp_path,
        reference={"mode": "online"},
        data={"eval_fraction": 0.0},
        train={"eval_every": 5},
    )
    with pytest.raises(UserError, match=r"train\.eval_every is set but the eval split is empty"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


# --- one real run: 2 Ray Train workers under ZeRO-3, against `kto-ray evaluate`, with all three trackers --
# (One run for what were two: this test's and tests/training/launch/test_tracking.py's real run,
# which read the same kind of 2-worker run; the trackers' assertions are that test's, unchanged.)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ray_train_eval_equals_kto_ray_evaluate_of_the_export(tiny_model, small_data, tmp_path, monkeypatch):
    from kto_ray.reference.precompute import precompute
    from kto_ray.tools.evaluate import evaluate
    from kto_ray.training.launch.driver import train
    from tests.conftest import make_config, read_metrics, registered_steps
    from tests.training.launch.test_tracking import (
        _losses,
        mlflow_history,
        tensorboard_scalars,
        wandb_history,
    )

    # Set after the session's Ray started: only the loop config can carry them to the workers.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_MODE", "offline")
    micro = 5
    cfg = make_config(
        tiny_model,
        small_data,
        tmp_path,
        data={"eval_fraction": 0.0875},  # 31 eval rows (hashed, about 8.75%): shards of 16 and 15 rows
        train={"max_steps": 3, "micro_batch_size": micro, "lr": 1e-3, "warmup_ratio": 0.0, "eval_every": 2},
        run={"name": "tracked", "checkpoint_every": 100, "report_to": ["tensorboard", "mlflow", "wandb"]},
    )
    rows = precompute(cfg).store.read_split("eval").num_rows
    assert rows % (2 * micro) and rows % 2  # uneven shards: rank 1 runs a dummy micro-batch
    assert len(shard_batches(1, 2, micro, np.ones(rows))) < most_batches(rows, 2, micro)
    result = train(cfg)
    run_dir = result.run_dir.local_path
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert registered_steps(run_dir) == [3]  # the last step is checkpointed, off the cadence too
    evaluated = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evaluated] == [2, 3]  # every eval_every steps, and the last
    # Step 2 evaluates the updated policy: it moved away from the reference (z0 and rewards non-zero).
    assert evaluated[0]["eval/rows"] == rows and abs(evaluated[0]["eval/rewards/margins"]) > 0
    scored = evaluate(cfg, str(run_dir / "final"))
    final = records[-1]
    for key, value in scored.items():
        assert final[f"eval/{key}"] == pytest.approx(value, abs=1e-4), key

    # Every step's loss, and every eval's, reached all three trackers (test_tracking.py's readers).
    expected, expected_eval = _losses(records), _losses(records, "eval/loss")
    assert sorted(expected_eval) == [2, 3]
    assert tensorboard_scalars(run_dir / "tensorboard", "loss") == pytest.approx(expected)
    assert tensorboard_scalars(run_dir / "tensorboard", "eval/loss") == pytest.approx(expected_eval)
    history, params = mlflow_history(uri, "tracked", "loss")
    assert history == pytest.approx(expected)
    assert mlflow_history(uri, "tracked", "eval/loss")[0] == pytest.approx(expected_eval)
    assert params["run.name"] == "tracked" and params["train.eval_every"] == "2"
    history, config = wandb_history(run_dir, "loss")
    assert history == pytest.approx(expected)
    assert wandb_history(run_dir, "eval/loss")[0] == pytest.approx(expected_eval)
    assert config["train"]["max_steps"] == 3
