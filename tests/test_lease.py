"""kto_ray.lease on local disk and on a real S3-compatible server (moto's, on 127.0.0.1): a held lease
refuses a second holder in one line naming it; a stale one (old heartbeat, dead pid on this host) is
taken over; the heartbeat refreshes; release deletes; of several acquiring at once, exactly one wins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from kto_ray.lease import LEASE, Lease, LeaseHeld, ensure_free, hold_lease
from kto_ray.storage import Location, read_text, resolve, write_text_atomically
from tests.s3server import s3_server

FAST = {"settle": 0.05, "heartbeat": 0.1}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        server.create_bucket("leases")
        yield server


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Location:
    if request.param == "local":
        return resolve(tmp_path / "store")
    request.getfixturevalue("s3")
    return resolve(f"s3://leases/{uuid.uuid4().hex[:8]}/store")


def _plant(where: Location, **fields) -> None:
    """A lease written by someone else (another host, or a given pid)."""
    now = time.time()
    holder = {"token": "theirs", "host": "elsewhere", "pid": 1, "what": "precompute"}
    holder |= {"started": now - 30, "heartbeat": now} | fields
    write_text_atomically(where.join(LEASE), json.dumps(holder))


def test_second_holder_is_refused_in_one_line_naming_the_first(where):
    ensure_free(where)  # nothing there yet
    with hold_lease(where, "precompute", **FAST) as first:
        with pytest.raises(LeaseHeld, match="in use by another precompute"):
            ensure_free(where)  # the early look, taking nothing
        with pytest.raises(LeaseHeld) as refused:
            Lease(where, "precompute", **FAST).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{where.given} is in use by another precompute")
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
        assert first.holder().token == first.mine.token  # the refused one left the lease alone
        first.check()
    assert read_text(where.join(LEASE)) is None  # released: deleted
    with hold_lease(where, "precompute", **FAST):  # and free again
        pass


def test_live_lease_of_another_host_refuses_and_a_stale_one_is_taken_over(where):
    _plant(where)
    with pytest.raises(LeaseHeld, match=r"in use by another precompute \(host elsewhere, pid 1, since "):
        Lease(where, "training run", **FAST).acquire()
    _plant(where, heartbeat=time.time() - 61)  # no heartbeat for over the TTL: its holder is gone
    with hold_lease(where, "training run", **FAST) as lease:
        assert lease.holder().token == lease.mine.token and lease.holder().what == "training run"


def test_dead_holder_on_this_host_is_taken_over_at_once(where):
    _plant(where, host=socket.gethostname(), pid=1)  # pid 1 lives (not ours to signal): still held
    with pytest.raises(LeaseHeld, match=r"pid 1, since"):
        Lease(where, "precompute", **FAST).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(where, host=socket.gethostname(), pid=dead.pid)  # fresh heartbeat, but its pid is gone
    with hold_lease(where, "precompute", **FAST) as lease:
        assert lease.holder().token == lease.mine.token


def _eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_heartbeat_refreshes_and_a_taken_over_holder_notices(where):
    with hold_lease(where, "precompute", **FAST) as lease:
        first = lease.holder().heartbeat
        assert _eventually(lambda: lease.holder().heartbeat > first)
        assert lease.holder().started == lease.mine.started
        # Another job took the lease over (ours looked stale to it): we stop beating, never overwrite
        # it, and refuse to commit. A beat already past its ownership check when the other job writes
        # lands after it (no conditional PUT): the takeover is then written again, as a job retrying
        # would; this holder must notice within a few beats.
        for _ in range(5):
            _plant(where)
            if _eventually(lambda: lease.lost, timeout=2.0):
                break
        assert lease.lost and lease.holder().token == "theirs"
        with pytest.raises(LeaseHeld, match="in use by another precompute"):
            lease.check()
    assert lease.holder().token == "theirs"  # release deletes only our own lease


def _race(where: Location, n: int) -> tuple[list[Lease], list[str]]:
    """`n` threads acquire at the same moment: the leases taken and the refusals."""
    start = threading.Barrier(n)
    won: list[Lease] = []
    refused: list[str] = []

    def acquire() -> None:
        lease = Lease(where, "precompute", settle=0.5, heartbeat=0.1)
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=acquire) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_of_several_acquiring_at_the_same_moment_exactly_one_wins(where):
    for _ in range(3):
        won, refused = _race(where, 4)
        assert len(won) == 1 and len(refused) == 3, refused
        assert all("is in use by another precompute" in m and "\n" not in m for m in refused)
        assert won[0].holder().token == won[0].mine.token
        won[0].release()
        assert read_text(where.join(LEASE)) is None
