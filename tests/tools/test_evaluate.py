"""`kto-ray evaluate` scores on the cluster's actors (kto_ray/reference/scoring.py): the numbers equal
a float32 forward of the same model in this process, and this process builds no model."""

from __future__ import annotations

import gc

import pytest
import torch

from kto_ray.errors import UserError
from kto_ray.models.loading import load_tokenizer
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.objective import EVAL_KEYS, kl_raw, kto_loss
from kto_ray.reference.precompute import precompute
from kto_ray.tools.evaluate import evaluate
from tests.helpers import make_config

pytestmark = pytest.mark.slow  # on the session's Ray


def _causal_lms_alive() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel))


@pytest.fixture(scope="module")
def cfg(tiny_model, small_data, tmp_path_factory, ray_local):
    cfg = make_config(
        tiny_model, small_data, tmp_path_factory.mktemp("evaluate"), data={"eval_fraction": 0.2}
    )
    precompute(cfg)
    return cfg


def test_evaluate_on_actors_equals_a_float32_forward_here(cfg, tiny_model):
    from transformers import AutoModelForCausalLM

    before = _causal_lms_alive()
    metrics = evaluate(cfg, str(tiny_model))
    assert _causal_lms_alive() == before  # the weights were loaded on the actors, not here
    assert list(metrics) == list(EVAL_KEYS)

    part = precompute(cfg).store.read_split("eval").to_pydict()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pad = load_tokenizer(cfg.model).pad_token_id
    with torch.no_grad():
        policy = sequence_logps(model, pad_sequences(part["prompt_ids"], part["completion_ids"], pad))
        policy_kl = sequence_logps(model, pad_sequences(part["prompt_ids"], part["kl_completion_ids"], pad))
    ref, desirable = torch.tensor(part["ref_logps"]), torch.tensor(part["label"])
    raw = kl_raw(policy_kl, torch.tensor(part["ref_kl_logps"]))
    expected = kto_loss(policy, ref, desirable, raw.clamp(min=0.0), beta=cfg.train.beta)
    assert metrics["rows"] == len(part["id"]) > 10
    assert metrics["kl/raw"] == pytest.approx(raw.item(), abs=1e-5)
    assert metrics["loss"] == pytest.approx(expected.loss.item(), abs=1e-5)
    margin = expected.rewards[desirable].mean() - expected.rewards[~desirable].mean()
    assert metrics["rewards/margins"] == pytest.approx(margin.item(), abs=1e-5)


def test_an_actor_pool_the_cluster_cannot_place_is_refused_in_one_line(cfg):
    too_many = cfg.model_copy(deep=True)
    too_many.precompute.actors, too_many.precompute.cpus_per_actor = 8, 1.0  # the test Ray has 2 CPUs
    with pytest.raises(UserError, match="cannot place the actor pool: 8 actors x") as err:
        evaluate(too_many)
    assert "precompute.actors" in str(err.value) and "\n" not in str(err.value)
