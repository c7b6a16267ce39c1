"""The chunked log-probs under DeepSpeed ZeRO-3 on 2 ranks (gloo): the LM head weight is partitioned
(and, when tied, shared with the embedding), yet values and full gradients equal a plain module's."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from kto_ray.internals.deepspeed_private import skip_shm_comm_op
from kto_ray.models.logprobs import pad_sequences, sequence_logps

pytestmark = pytest.mark.slow

VOCAB = 131_072
ROW_WEIGHTS = torch.tensor([1.0, -2.0, 0.5])


def _save_model(folder, tied: bool) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def _rank_batch(rank: int):
    gen = torch.Generator().manual_seed(10 + rank)
    lengths = [(4, 9), (11, 2), (3, 14)]
    prompts = [torch.randint(4, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(4, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    return pad_sequences(prompts, completions, pad_id=0)


def _loss(model, rank: int, chunk_tokens):
    logps = sequence_logps(model, _rank_batch(rank), chunk_tokens=chunk_tokens)
    return (logps * ROW_WEIGHTS).sum(), logps.detach()


def _worker(rank: int, port: int, folders: list[str], out: dict) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

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
        "zero_allow_untested_optimizer": True,  # SGD at lr 0: only the gradients are read
    }
    results = {}
    for folder, chunk_tokens in ((f, c) for f in folders for c in (None, 5)):
        keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained loads partitioned (zero.Init)
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.lm_head.weight.numel() == 0  # partitioned: the chunked path must gather it
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        loss, logps = _loss(engine.module, rank, chunk_tokens)
        engine.backward(loss)
        grads = {
            name: deepspeed.utils.safe_get_full_grad(param).clone()
            for name, param in engine.module.named_parameters()
        }
        results[folder, chunk_tokens] = (logps, grads)
        del keep_alive
    if rank == 0:
        out["results"] = results
    else:
        out["rank1_logps"] = {k: v[0] for k, v in results.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _expected(folder: str):
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    losses, logps = zip(*(_loss(plain, rank, None) for rank in (0, 1)))
    # DeepSpeed averages gradients over ranks: the gradient of the mean of the two ranks' losses.
    (sum(losses) / 2).backward()
    return logps, {name: p.grad for name, p in plain.named_parameters()}


def test_chunked_logprobs_under_zero3_on_two_ranks(tmp_path):
    folders = [str(tmp_path / "tied"), str(tmp_path / "untied")]
    _save_model(folders[0], tied=True)
    _save_model(folders[1], tied=False)
    expected = {folder: _expected(folder) for folder in folders}

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), folders, out), nprocs=2, start_method="spawn")
        results, rank1_logps = out["results"], out["rank1_logps"]

    assert len(results) == 4  # tied and untied, full and chunked
    for (folder, chunk_tokens), (logps, grads) in results.items():
        expected_logps, expected_grads = expected[folder]
        torch.testing.assert_close(logps, expected_logps[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank1_logps[folder, chunk_tokens], expected_logps[1], rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            error = (grads[name] - grad).norm() / grad.norm()
            assert error <= 1e-5, f"chunk_tokens={chunk_tokens} {name}: relative error {error:.2e}"
