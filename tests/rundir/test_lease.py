"""kto_ray.rundir.lease on local disk and on a real S3-compatible server (moto's, on 127.0.0.1): a held lease
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

from kto_ray.conditional import _s3_client, conditional_file
from kto_ray.rundir.lease import LEASE, Lease, LeaseHeld, ensure_free
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
    with Lease(where, "precompute", **FAST) as first:
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
    with Lease(where, "precompute", **FAST):  # and free again
        pass


def test_live_lease_of_another_host_refuses_and_a_stale_one_is_taken_over(where):
    _plant(where)
    with pytest.raises(LeaseHeld, match=r"in use by another precompute \(host elsewhere, pid 1, since "):
        Lease(where, "training run", **FAST).acquire()
    _plant(where, heartbeat=time.time() - 61)  # no heartbeat for over the TTL: its holder is gone
    with Lease(where, "training run", **FAST) as lease:
        assert lease.holder().token == lease.mine.token and lease.holder().what == "training run"


def test_dead_holder_on_this_host_is_taken_over_at_once(where):
    _plant(where, host=socket.gethostname(), pid=1)  # pid 1 lives (not ours to signal): still held
    with pytest.raises(LeaseHeld, match=r"pid 1, since"):
        Lease(where, "precompute", **FAST).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(where, host=socket.gethostname(), pid=dead.pid)  # fresh heartbeat, but its pid is gone
    with Lease(where, "precompute", **FAST) as lease:
        assert lease.holder().token == lease.mine.token


def _eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_heartbeat_refreshes_and_a_taken_over_holder_notices(where):
    with Lease(where, "precompute", **FAST) as lease:
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


def _race(where: Location, n: int, timing: dict | None = None) -> tuple[list[Lease], list[str]]:
    """`n` threads acquire at the same moment: the leases taken and the refusals."""
    start = threading.Barrier(n)
    won: list[Lease] = []
    refused: list[str] = []

    def acquire() -> None:
        lease = Lease(where, "precompute", **(timing or {"settle": 0.5, "heartbeat": 0.1}))
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


# --- conditional writes: no settle wait where the storage has them (kto_ray.conditional) -----------

NO_SETTLE = {"settle": 30.0, "heartbeat": 0.1}  # a settle wait would show as a 30 s acquire


def test_racing_creators_with_no_wait_exactly_one_wins(where):
    assert conditional_file(where.join(LEASE)) is not None
    for _ in range(3):
        started = time.monotonic()
        won, refused = _race(where, 4, NO_SETTLE)
        assert time.monotonic() - started < 10.0  # settled by the storage, not by waiting
        assert len(won) == 1 and len(refused) == 3, refused
        assert all("is in use by another precompute" in m for m in refused)
        assert won[0].holder().token == won[0].mine.token
        won[0].release()
        assert read_text(where.join(LEASE)) is None


def test_racing_takers_of_a_stale_lease_exactly_one_wins(where):
    for _ in range(3):
        _plant(where, heartbeat=time.time() - 61)
        won, refused = _race(where, 4, NO_SETTLE)
        assert len(won) == 1 and len(refused) == 3, refused
        assert won[0].holder().token == won[0].mine.token
        won[0].release()
        assert read_text(where.join(LEASE)) is None


_CONTENDER = """
import sys, time
from kto_ray.rundir.lease import Lease, LeaseHeld
from kto_ray.storage import resolve
lease = Lease(resolve(sys.argv[1]), "precompute", settle=30.0, heartbeat=0.1)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lease.acquire()
except LeaseHeld:
    print("refused")
else:
    print("won")
    time.sleep(1.0)  # hold it while the others look
    lease.release()
"""


def test_racing_processes_on_local_disk_exactly_one_wins(tmp_path):
    store = tmp_path / "store"
    at = time.time() + 3.0  # all past their imports by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(store), str(at)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not (store / LEASE).exists() and sorted(p.name for p in store.iterdir()) == []


def test_a_stale_holder_back_after_a_takeover_never_overwrites_it(where):
    with Lease(where, "precompute", **FAST) as first:
        first._stop.set()  # its beats stop (a stalled job) ...
        time.sleep(0.3)
        taker = Lease(where, "training run", ttl=0.2, **FAST).acquire()  # ... and it looks stale
        try:
            assert not first._refresh()  # back: its conditional beat fails instead of overwriting
            assert taker.holder().token == taker.mine.token
            with pytest.raises(LeaseHeld, match="in use by another training run"):
                first.check()
        finally:
            taker.release()
        assert read_text(where.join(LEASE)) is None


def test_without_boto3_s3_settles_by_write_wait_and_reread(s3, monkeypatch):
    """Installed without boto3 (pip --no-deps): no conditional writes, the settle path."""
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 raises ImportError
    _s3_client.cache_clear()
    try:
        where = resolve(f"s3://leases/{uuid.uuid4().hex[:8]}/store")
        assert conditional_file(where.join(LEASE)) is None
        won, refused = _race(where, 4, {"settle": 0.5, "heartbeat": 0.1})
        assert len(won) == 1 and len(refused) == 3, refused
        assert won[0].file is None and won[0].holder().token == won[0].mine.token
        won[0].release()
        assert read_text(where.join(LEASE)) is None
    finally:
        _s3_client.cache_clear()


def test_a_server_ignoring_conditions_is_found_and_the_lease_settles_instead(caplog):
    with s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        server.create_bucket("leases")
        server.relay.ignore_conditions = True
        where = resolve(f"s3://leases/{uuid.uuid4().hex[:8]}/store")
        with caplog.at_level("WARNING", logger="kto_ray.rundir.lease"):
            won, refused = _race(where, 4, {"settle": 0.5, "heartbeat": 0.1})
        assert len(won) == 1 and len(refused) == 3, refused
        assert won[0].file is None  # fell back to write, wait, re-read
        assert "the S3 endpoint ignores IfNoneMatch on PUT; settling by write" in caplog.text
        won[0].release()
        assert read_text(where.join(LEASE)) is None
