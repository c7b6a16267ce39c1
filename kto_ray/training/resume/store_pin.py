"""The store a run trains on, pinned in its run dir (`store.json`): a resume needs the same rows.

A checkpoint's step index is a position in the batch schedule drawn over the train split; after an
append (kto_ray/store/segments.py) the split has more rows, the schedule is another one and the
step no longer says which rows were seen, so such a resume is refused.
"""

from __future__ import annotations

import json

from kto_ray.config import KTOConfig
from kto_ray.errors import UserError
from kto_ray.rundir import RunDir
from kto_ray.storage import display
from kto_ray.store.format import differing_components, read_manifest

STORE_PIN = "store.json"


def pin_store(cfg: KTOConfig, run_dir: RunDir) -> None:
    """Record the store of an offline run; refuse a resume whose store's fingerprint has changed."""
    if cfg.reference.mode != "offline":
        return
    manifest = read_manifest(cfg.store.path)
    if manifest is None:
        return
    rows = sum(manifest.counts.get("train", {}).values())
    pinned_text = run_dir.read_text(STORE_PIN)
    if pinned_text is not None and run_dir.checkpoint_names():
        pinned = json.loads(pinned_text)
        differing = differing_components(pinned["fingerprint"], manifest.fingerprint)
        if differing:
            raise UserError(
                f"run {run_dir} started on reference store {pinned['store']} with {pinned['train_rows']} "
                f"train rows; the store now has {rows} (its {', '.join(differing)} changed since, as an "
                "append does), so its checkpoints cannot resume on it: train the grown store under a new "
                "run.name"
            )
    pin = {"store": display(cfg.store.path), "fingerprint": manifest.fingerprint, "train_rows": rows}
    run_dir.write_text(STORE_PIN, json.dumps(pin, indent=2))
