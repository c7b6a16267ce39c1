"""LoRA (peft) training on a local Ray cluster with real DeepSpeed (ZeRO-3 and ZeRO-2) and the tiny model:
what trains, what the checkpoints hold, resume, the online reference without a second model, and the
exports (adapter in PEFT's format, merged model, `kto-ray evaluate` on an adapter folder)."""

from __future__ import annotations

import gc
import multiprocessing
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kto_ray.internals.deepspeed_private import skip_shm_comm_op
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.training.launch.driver import train
from kto_ray.training.schedule.batching import Schedule, collate
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

STEPS = 4
LORA = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


def _config(built_store, root: Path, name: str, **sections):
    cfg, _store = built_store
    tree = cfg.model_dump(mode="json")
    # Constant LR: a run stopped at step 2 and rerun to step 4 follows the 4-step run's schedule.
    train_section = {
        "max_steps": STEPS,
        "micro_batch_size": 4,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        "schedule": "constant",
    } | sections.pop("train", {})
    run = {"name": name, "dir": str(root), "checkpoint_every": 2, "merge_lora": True} | sections.pop(
        "run", {}
    )
    for section, values in {"train": train_section, "run": run, "lora": LORA, **sections}.items():
        tree[section] = tree[section] | values
    return cfg.model_validate(tree)


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / "zero"


def _optimized_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The fp32 tensors the optimizer holds in a checkpoint (merged over ranks by DeepSpeed's tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = _checkpoint(run_dir, step)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def _peft_base(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _adapter_model(tiny_model: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_peft_base(tiny_model), adapter).eval()


def _eval_batch(store, rows: int = 16):
    part = store.read_split("eval").slice(0, rows).to_pydict()
    return pad_sequences(part["prompt_ids"], part["completion_ids"], 0)


@pytest.fixture(scope="module")
def lora_runs(ray_local, built_store, tmp_path_factory):
    """4 steps on 2 ZeRO-3 workers; the same run stopped after 2 steps (its adapter kept) and rerun to 4;
    2 steps with the online reference on 2 ZeRO-2 workers."""
    root = tmp_path_factory.mktemp("lora")
    full = train(_config(built_store, root, "full")).run_dir.local_path
    first = train(_config(built_store, root, "resumed", train={"max_steps": 2}, run={"merge_lora": False}))
    after_two = root / "after_two"
    shutil.copytree(first.run_dir.local_path / "final", after_two)
    resumed = train(_config(built_store, root, "resumed", run={"merge_lora": False})).run_dir.local_path
    online = train(
        _config(
            built_store,
            root,
            "online",
            train={"max_steps": 2},
            reference={"mode": "online"},
            deepspeed={"stage": 2},
            run={"merge_lora": False},
        )
    ).run_dir.local_path
    return {"full": full, "after_two": after_two, "resumed": resumed, "online": online}


def test_only_the_adapters_train_and_checkpoints_hold_nothing_else(lora_runs, built_store, tiny_model):
    from peft import get_peft_model

    from kto_ray.training.lora import peft_config

    cfg = _config(built_store, Path("/unused"), "x")
    reference = get_peft_model(_peft_base(tiny_model), peft_config(cfg.lora))
    trainable, _total = reference.get_nb_trainable_parameters()
    expected = {n.replace(".default", "") for n, p in reference.named_parameters() if p.requires_grad}
    optimized = _optimized_state(lora_runs["full"], STEPS)
    names = {n.replace(".default", "") for n in optimized}
    assert names == expected and all("lora_" in n for n in names)
    assert sum(t.numel() for t in optimized.values()) == trainable
    # exclude_frozen_parameters: the module state of each rank holds the adapters only, not the base.
    module_files = sorted(_checkpoint(lora_runs["full"], STEPS).glob("*model_states.pt"))
    assert module_files
    for path in module_files:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        assert module and all("lora_" in key for key in module)


def test_base_weights_are_unchanged_and_the_merge_is_base_plus_delta(lora_runs, tiny_model):
    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(lora_runs["full"] / "merged" / "model.safetensors")
    adapter = load_file(lora_runs["full"] / "final" / "adapter_model.safetensors")
    assert merged.keys() == base.keys()
    scaling = LORA["alpha"] / LORA["r"]
    deltas = 0
    for name, original in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = adapter.get(f"{prefix}.lora_A.weight"), adapter.get(f"{prefix}.lora_B.weight")
        if a is None:
            torch.testing.assert_close(merged[name], original, atol=0, rtol=0)
            continue
        delta = scaling * b @ a
        assert delta.abs().max() > 1e-4  # the adapter trained
        torch.testing.assert_close(merged[name] - delta, original, atol=1e-6, rtol=0)
        deltas += 1
    assert deltas == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers


def test_exported_adapter_gives_the_trained_policy_logps(lora_runs, built_store, tiny_model):
    """The rerun's first step (step 3) logged the policy's mean log-probs with the 2-step weights, which
    the first run exported: the same rows through PeftModel.from_pretrained(base, final) match."""
    cfg, store = built_store
    table = store.read_split("train")
    schedule = Schedule.for_table(table, 2, 4, 1, cfg.train.seed, group=False)
    model = _adapter_model(tiny_model, lora_runs["after_two"])
    chosen, rejected = [], []
    with torch.no_grad():
        for rank in range(2):
            for rows in schedule.rows_for(2, rank):
                batch = collate(table, rows, 0)
                logps = sequence_logps(model, batch.policy)
                chosen.append(logps[batch.desirable])
                rejected.append(logps[~batch.desirable])
    step_three = read_metrics(lora_runs["resumed"])[2]
    assert step_three["step"] == 3
    assert torch.cat(chosen).mean().item() == pytest.approx(step_three["logps/chosen"], rel=1e-5)
    assert torch.cat(rejected).mean().item() == pytest.approx(step_three["logps/rejected"], rel=1e-5)


def test_merged_export_equals_the_adapter_applied_model_and_evaluate_reads_both(
    lora_runs, built_store, tiny_model
):
    from kto_ray.tools.evaluate import evaluate

    cfg, store = built_store
    final, merged_dir = lora_runs["full"] / "final", lora_runs["full"] / "merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    batch = _eval_batch(store)
    with torch.no_grad():
        adapted = sequence_logps(_adapter_model(tiny_model, final), batch)
        merged = sequence_logps(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), batch)
        base = sequence_logps(_peft_base(tiny_model), batch)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)
    assert (adapted - base).abs().max() > 1e-3
    from_adapter, from_merged = evaluate(cfg, str(final)), evaluate(cfg, str(merged_dir))
    for key, value in from_merged.items():
        assert from_adapter[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(lora_runs):
    full = read_metrics(lora_runs["full"])
    resumed = read_metrics(lora_runs["resumed"])
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    end_full = load_file(lora_runs["full"] / "final" / "adapter_model.safetensors")
    end_resumed = load_file(lora_runs["resumed"] / "final" / "adapter_model.safetensors")
    assert end_full.keys() == end_resumed.keys()
    for name in end_full:
        torch.testing.assert_close(end_resumed[name], end_full[name], atol=1e-5, rtol=0)
    # The optimizer state resumed too: the step-4 Adam moments equal the uninterrupted run's.
    full_optimizer = _optimized_state(lora_runs["full"], STEPS)
    for name, value in _optimized_state(lora_runs["resumed"], STEPS).items():
        torch.testing.assert_close(value, full_optimizer[name], atol=1e-5, rtol=0)


def test_zero2_online_reference_by_disabled_adapters_matches_zero3_offline(lora_runs):
    """ZeRO-2 with the reference computed by the policy with its adapters off gives the ZeRO-3 run's
    steps computed against the store's reference log-probs."""
    online, offline = read_metrics(lora_runs["online"]), read_metrics(lora_runs["full"])[:2]
    assert len(online) == 2
    assert online[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # lora_B = 0: policy == reference
    for a, b in zip(online, offline):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # Adam's first steps move each weight by about +-lr whatever its gradient's size, so a near-zero
    # gradient summed in another order (ZeRO-2 vs ZeRO-3 reductions) may move a weight differently:
    # a tenth of one step (lr 1e-2) bounds that; a wrong reference would be off by whole steps.
    after_two = load_file(lora_runs["after_two"] / "adapter_model.safetensors")
    for name, value in load_file(lora_runs["online"] / "final" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, after_two[name], atol=1e-3, rtol=0)


def _online_reference_process(cfg_tree: dict, port: int, out) -> None:
    """One ZeRO-3 rank (gloo): the worker's own build_policy_engine + online_reference; then counts the
    causal LMs alive in the process and compares the reference with the base model."""
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0"})
    os.environ["WORLD_SIZE"] = "1"
    import deepspeed
    from transformers import PreTrainedModel

    from kto_ray.config import KTOConfig
    from kto_ray.training.engine import build_policy_engine, deepspeed_config, online_reference

    skip_shm_comm_op(deepspeed)  # as the workers do: no JIT build of an op nothing calls
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = KTOConfig.model_validate(cfg_tree)
    engine = build_policy_engine(cfg, deepspeed_config(cfg, 1, hidden_size=64), 1)
    reference = online_reference(cfg, engine, 1)
    gc.collect()
    # The base LlamaForCausalLM inside the PeftModel is the only causal LM (LlamaModel is its decoder).
    causal_lms = sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel) and hasattr(o, "lm_head"))
    policy = engine.module
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.normal_(0, 0.5)  # a trained adapter: the policy now differs from the base
    batch = pad_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]], 3)
    mb = collate_like(batch)
    with torch.no_grad():
        ref_y, _ref_kl = reference(mb)
        adapted = sequence_logps(policy, batch)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = sequence_logps(base, batch)
    out.put((causal_lms, ref_y.tolist(), plain.tolist(), adapted.tolist()))


def collate_like(batch):
    """A micro-batch whose policy and KL pairs are the same padded rows (what the reference reads)."""
    from kto_ray.training.schedule.batching import KTOBatch

    rows = batch.input_ids.shape[0]
    return KTOBatch(
        policy=batch,
        kl=batch,
        desirable=torch.ones(rows, dtype=torch.bool),
        ref_logps=torch.zeros(rows),
        ref_kl_logps=torch.zeros(rows),
        ids=torch.arange(rows),
    )


def test_online_reference_with_lora_is_the_policy_without_adapters_and_no_second_model(built_store):
    cfg = _config(built_store, Path("/unused"), "x", reference={"mode": "online"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=_online_reference_process, args=(cfg.model_dump(mode="json"), port, queue))
    proc.start()
    causal_lms, ref_y, plain, adapted = queue.get(timeout=240)
    proc.join(timeout=60)
    assert causal_lms == 1  # the policy's base only: no reference model was built
    torch.testing.assert_close(torch.tensor(ref_y), torch.tensor(plain), atol=1e-5, rtol=0)
    assert (torch.tensor(adapted) - torch.tensor(plain)).abs().max() > 1e-2


def test_real_model_lora_with_the_online_reference_trains_and_exports(real_model, ray_local, tmp_path):
    """SmolLM2-135M (tied embeddings) on the chat sample: 2 steps on 2 ZeRO-3 workers, the reference
    being the policy with its adapters off; the adapter export loads (base + adapter) and moved."""
    from kto_ray.config import config_from_dict
    from kto_ray.models.loading import load_causal_lm, load_tokenizer
    from tests.helpers import REPO, make_config

    cfg = make_config(
        real_model,
        REPO / "data" / "chat_sample.jsonl",
        tmp_path,
        data={"max_length": 128, "max_prompt_length": 96, "eval_fraction": 0.25},
        reference={"mode": "online"},
        train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0},
        run={"name": "real", "checkpoint_every": 2},
    )
    cfg = config_from_dict(cfg.model_dump(mode="json") | {"lora": LORA})
    run_dir = train(cfg).run_dir.local_path
    first, second = read_metrics(run_dir)
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and abs(first["kl"]) < 1e-5
    # Step 2 scores a policy one step away from its reference (the same model, adapters off): the
    # rewards of each class the step holds are off 0. Not the margin: it is 0 by definition when a
    # class is absent, as in this split's step 2 (4 undesirable rows).
    held = [name for name in ("chosen", "rejected") if second[f"count/{name}"] > 0]
    assert held and all(abs(second[f"rewards/{name}"]) > 1e-6 for name in held), second
    tokenizer = load_tokenizer(cfg.model)
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    batch = pad_sequences([ids[:-2]], [ids[-2:]], tokenizer.pad_token_id)
    with torch.no_grad():
        adapted = sequence_logps(
            load_causal_lm(cfg.model, torch.float32, str(run_dir / "final")).eval(), batch
        )
        base = sequence_logps(load_causal_lm(cfg.model, torch.float32).eval(), batch)
    assert torch.isfinite(adapted).all() and (adapted - base).abs().max() > 1e-5
