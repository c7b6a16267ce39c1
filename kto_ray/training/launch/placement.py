"""Before launch: can the cluster place the worker group? Ray Train waits silently for resources, so a
group that never fits would hang without a word.

What exists: the alive nodes' total resources (`ray.nodes()`). Whether the cluster can grow: the
autoscaler's node groups as it reports them to the GCS (`kto_ray.internals.ray_private.autoscaler_limits`,
what Ray Train's own resource check reads). Without one (a local Ray, nodes started by hand) a group the
cluster cannot place now is refused in one line, exit 2.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kto_ray.config import KTOConfig
from kto_ray.errors import UserError
from kto_ray.internals.ray_private import autoscaler_limits

NOTICE_EVERY_S = 30.0
_POLL_S = 5.0


@dataclass(frozen=True)
class Ask:
    """The worker group (or actor pool) a config asks for."""

    workers: tuple[int, int]  # (min, max)
    bundle: dict[str, float]
    strategy: str
    group: str = "worker group"  # what is placed, as the one line names it
    unit: str = "workers"
    knobs: str = "cluster.workers or cluster.cpus_per_worker"  # what to lower

    @classmethod
    def of(cls, cfg: KTOConfig) -> Ask:
        return cls(cfg.cluster.worker_range, cfg.cluster.worker_bundle, cfg.cluster.placement_strategy)

    @classmethod
    def of_actors(cls, cfg: KTOConfig) -> Ask:
        """precompute's actor pool, which evaluate and --generate use too (kto_ray/reference/scoring.py)."""
        p = cfg.precompute
        bundle = {"CPU": p.cpus_per_actor} | ({"GPU": p.gpus_per_actor} if p.gpus_per_actor else {})
        knobs = "precompute.actors, precompute.cpus_per_actor or precompute.gpus_per_actor"
        return cls((p.actors, p.actors), bundle, "PACK", "actor pool", "actors", knobs)

    def __str__(self) -> str:
        low, high = self.workers
        count = str(low) if low == high else f"{low}-{high}"
        per = ", ".join(f"{v:g} {k}" for k, v in self.bundle.items())
        return f"{count} {self.unit} x ({per}) placed {self.strategy}"


def capacity(nodes: list[dict[str, float]], bundle: dict[str, float], strategy: str) -> int:
    """How many of `bundle` the nodes hold at once under `strategy` (Ray places a bundle on one node)."""
    per_node = [
        min(
            (math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in bundle.items() if need > 0),
            default=0,
        )
        for node in nodes
    ]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n >= 1)
    return sum(per_node)  # PACK, SPREAD: best effort, any bin-packing that fits


def _describe(nodes: list[dict[str, float]]) -> str:
    keys = ("CPU", "GPU")
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in keys}
    kinds = ", ".join(f"{total[k]:g} {k}" for k in keys if total[k] or k == "CPU")
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} with {kinds} in all"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_placement(ask: Ask, nodes: list[dict[str, float]], growth: dict[str, float] | None) -> str | None:
    """Raise a UserError when the cluster (its alive nodes' resources, and `growth`: what its
    autoscaler may bring up, None when it cannot grow) can never place the group's minimum; return the
    line to say when it must wait for the autoscaler (None when it fits now)."""
    low = ask.workers[0]
    held = capacity(nodes, ask.bundle, ask.strategy)
    if held >= low:
        return None
    if growth is None:
        raise UserError(
            f"the cluster cannot place the {ask.group}: {ask} asked, it holds {held} "
            f"({_describe(nodes)}) and cannot grow (no autoscaler reports node groups); lower "
            f"{ask.knobs}, or add nodes"
        )
    if not all(growth.get(key, 0.0) >= need * low for key, need in ask.bundle.items()):
        most = ", ".join(f"{growth.get(k, 0.0):g} {k}" for k in ask.bundle)
        raise UserError(
            f"the cluster cannot place the {ask.group}: {ask} asked, and its autoscaler can bring up "
            f"at most {most}; lower {ask.knobs}"
        )
    return (
        f"waiting for the autoscaler: {ask} asked (starting at {low}), the cluster holds {held} now "
        f"({_describe(nodes)})"
    )


@contextlib.contextmanager
def placement_notices(
    ask: Ask,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
    nodes: Callable[[], list[dict[str, float]]] = _alive_nodes,
    every_s: float = NOTICE_EVERY_S,
    poll_s: float = _POLL_S,
) -> Iterator[None]:
    """Check the placement (raising when it can never fit); while the group waits for nodes, say so
    once and then about every `every_s` seconds with the time waited, until the minimum fits."""
    first = check_placement(ask, nodes(), autoscaler_limits())
    if first is None:
        yield
        return
    say(first)
    done = threading.Event()

    def follow() -> None:
        began = last = time.monotonic()
        while not done.wait(poll_s):
            now = time.monotonic()
            try:
                fits = capacity(nodes(), ask.bundle, ask.strategy) >= ask.workers[0]
            except Exception:  # the cluster's state is only advisory here
                fits = False
            if fits:
                say(f"the cluster can place the {ask.group} now (waited {now - began:.0f} s)")
                return
            if now - last >= every_s:
                say(f"still waiting for nodes for {ask} ({now - began:.0f} s so far)")
                last = now

    thread = threading.Thread(target=follow, name="kto-placement-notices", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=poll_s + 1)
