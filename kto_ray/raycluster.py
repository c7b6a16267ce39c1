"""Connecting to Ray: the cluster a job was submitted to, a given address, or a private local one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from kto_ray.console import ray_init_options


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use a running Ray (already initialized, RAY_ADDRESS of `ray job submit`, or `address`), else
    start a private local one whose dashboard is off; shut down only what this call started.

    "Else" includes `local` and no address at all: never Ray's own fallback of joining whatever
    `ray start` cluster last ran on this host, which is not the cluster anyone asked for."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        started, options = nullcontext(), {"address": address}
    else:
        started = no_state_api_lookup()
        options = {"address": "local", "include_dashboard": False, "dashboard_host": "127.0.0.1"}
    with started:
        ray.init(**options, **ray_init_options())
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def no_state_api_lookup() -> Iterator[None]:
    """For a local Ray without a dashboard, started inside: Ray Train's placement-group cleaner finds
    the state API through /tmp/ray/ray_current_cluster, the Ray started last on this host, so another
    Ray there would make it remove our placement group mid-run (and, with none, it warns every few
    seconds). Point the lookup nowhere while this Ray starts (its processes inherit it), then restore
    the environment, so later clients in this process (`ray job ...`) find real API servers."""
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
