"""Safe defaults: no remote code, no pickle weights, no dashboard on a locally started Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from kto_ray.config import ModelConfig
from kto_ray.errors import UserError
from kto_ray.models.loading import load_causal_lm


def test_defaults_are_safe():
    model = ModelConfig()
    assert model.trust_remote_code is False
    assert model.allow_pickle_weights is False


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    torch.save(state, pickled / "pytorch_model.bin")  # the legacy pickle format
    (pickled / "model.safetensors").unlink()
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))

    with pytest.raises(UserError, match=r"cannot load model from .*pickled"):
        load_causal_lm(ModelConfig(path=str(pickled)), torch.float32)
    allowed = load_causal_lm(ModelConfig(path=str(pickled), allow_pickle_weights=True), torch.float32)
    assert sum(p.numel() for p in allowed.parameters()) > 0


def test_remote_code_is_not_run_by_default(tiny_model, tmp_path):
    # A checkpoint whose config asks for custom code: its code never executes; the built-in class loads.
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))

    model = load_causal_lm(ModelConfig(path=str(folder)), torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_local_ray_starts_without_a_dashboard():
    # In a fresh process: the session's own Ray (if any) must not answer for ray_session.
    code = (
        "import ray\n"
        "from kto_ray.raycluster import ray_session\n"
        "with ray_session():\n"
        "    info = ray._private.worker.global_worker.node.address_info\n"
        "    print('DASHBOARD', info.get('webui_url') or None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DASHBOARD None" in out.stdout
