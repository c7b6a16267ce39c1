"""Packed batches under DeepSpeed ZeRO-3 on 2 ranks (gloo): the once-per-model check runs as a
collective forward on every rank, and packed log-probs and full gradients equal a plain module's
padded ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

from kto_ray.internals.deepspeed_private import skip_shm_comm_op
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.models.packing import pack_sequences
from tests.models.test_chunked_zero3 import ROW_WEIGHTS, VOCAB, _free_port, _save_model

pytestmark = pytest.mark.slow


def _rows(rank: int):
    gen = torch.Generator().manual_seed(20 + rank)
    lengths = [(4, 12), (3, 2), (2, 4)]  # the two short rows share a lane beside the long one
    prompts = [torch.randint(4, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(4, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    return prompts, completions


def _worker(rank: int, port: int, folder: str, out: dict) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from kto_ray.models import packing

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    os.environ["WORLD_SIZE"] = "2"
    skip_shm_comm_op(deepspeed)  # as the workers do: no JIT build of an op nothing calls
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    keep_alive = HfDeepSpeedConfig(ds_config)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds_config
    )
    logps = sequence_logps(engine.module, pack_sequences(*_rows(rank), pad_id=0), chunk_tokens=5)
    engine.backward((logps * ROW_WEIGHTS).sum())
    grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    out[rank] = (logps.detach(), grads, packing.keeps_rows_apart(engine.module))
    del keep_alive


def test_packed_logprobs_under_zero3_on_two_ranks(tmp_path):
    folder = str(tmp_path / "tied")
    _save_model(folder, tied=True)
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = [sequence_logps(plain, pad_sequences(*_rows(rank), pad_id=0)) for rank in (0, 1)]
    (sum((logps * ROW_WEIGHTS).sum() for logps in expected) / 2).backward()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), folder, out), nprocs=2, start_method="spawn")
        results = dict(out)

    for rank in (0, 1):
        logps, grads, packed = results[rank]
        assert packed  # the check passed on both ranks: the batches really ran packed
        torch.testing.assert_close(logps, expected[rank].detach(), rtol=1e-5, atol=1e-5)
    _, grads, _ = results[0]
    for name, param in plain.named_parameters():
        error = (grads[name] - param.grad).norm() / param.grad.norm()
        assert error < 1e-5, name
