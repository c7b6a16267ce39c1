"""A lease on a location (local folder or object-storage prefix): one job at a time writes there.

The lease is a small JSON object, `<location>/.lease.json`. Where the storage has conditional writes
(local disk and shared mounts, S3: kto_ray.conditional) it is created only if absent, taken over only
if still the stale version read, refreshed only if still ours and deleted only if still ours: of
several writers at once exactly one succeeds, with no waiting. Elsewhere (GCS, other file systems) it
is taken by "write, wait, re-read": the last writer wins and every writer re-reads after a settle
time, so at most one proceeds. The holder refreshes its heartbeat from a daemon thread and deletes the
object on release. A lease whose heartbeat is older than the TTL, or whose holder's pid is gone on this
host, is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from kto_ray.conditional import ConditionsIgnored, Versioned, conditional_file
from kto_ray.errors import UserError
from kto_ray.storage import Location, display, read_text, write_text_atomically

log = logging.getLogger(__name__)

LEASE = ".lease.json"
TTL_S, HEARTBEAT_S, SETTLE_S = 60.0, 5.0, 2.0
# Tokens of the leases this process holds or is taking now: a lease file naming this process but none
# of these is one it failed to delete (storage was away at release), so it is stale.
_HELD: set[str] = set()


class LeaseHeld(UserError):
    """Another live job holds the location's lease; one line naming it, its host, pid and start."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    what: str
    started: float
    heartbeat: float

    def live(self, ttl: float) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False  # crashed on this host: no need to wait for the TTL
        if self.host == socket.gethostname() and self.pid == os.getpid() and self.token not in _HELD:
            return False  # ours from an earlier job in this process that could not delete it
        return time.time() - self.heartbeat < ttl


class Lease:
    """`acquire()` takes the lease or raises `LeaseHeld` (one line); `release()` deletes it (storage
    errors are passed on from acquire, swallowed on release); `with Lease(...)` holds it for the block.
    `check()` raises when another job took it over. `what` names this job in the refusal others get
    ("precompute", "training run")."""

    def __init__(
        self, location: Location, what: str, *, ttl: float = TTL_S, heartbeat: float = HEARTBEAT_S,
        settle: float = SETTLE_S,
    ):  # fmt: skip
        self.location, self.target, self.where = location, location.join(LEASE), display(location.given)
        self.ttl, self.interval, self.settle = ttl, heartbeat, settle
        now = time.time()
        self.mine = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), what, now, now)
        self.lost = False
        # Conditional writes where the storage has them (None: settle by write, wait, re-read), and
        # the version of the lease we last wrote, which the next conditional write expects.
        self.file, self.version = conditional_file(self.target), None
        self._stop, self._lock = threading.Event(), threading.Lock()

    def acquire(self) -> Lease:
        _HELD.add(self.mine.token)  # from the first write on: ours to this process, not stale
        try:
            for _ in range(3):
                self.refuse_if_held()
                if self._take():
                    break
                self.refuse_if_held()  # another writer came first (or wrote after us): it wins, we refuse
            else:  # ours vanished each time (a release racing ours): refuse rather than guess
                raise LeaseHeld(f"could not take the lease on {self.where}: it keeps changing; retry")
        except BaseException:
            _HELD.discard(self.mine.token)
            raise
        threading.Thread(target=self._beat, name=f"lease {self.where}", daemon=True).start()
        return self

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _take(self) -> bool:
        """One attempt to write our lease over nothing or a stale one: True when it is ours."""
        if self.file is None:
            write_text_atomically(self.target, self._text())
            time.sleep(self.settle)
            return self._ours()
        seen = self.file.read()
        if self._other_live(self._parse(seen)):
            return False
        try:
            text = self._text()
            self.version = self.file.create(text) if seen is None else self.file.replace(text, seen.version)
        except ConditionsIgnored as err:
            log.warning("lease on %s: %s; settling by write, wait and re-read", self.where, err)
            self.file = None
            return self._take()
        return self.version is not None

    def check(self) -> None:
        """Raise `LeaseHeld` unless the lease is still ours (call right before committing)."""
        if self.lost or not self._ours():
            self.refuse_if_held()
            raise LeaseHeld(f"lost the lease on {self.where} to another job while this {self.mine.what} ran")

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.mine.token)
        with self._lock, contextlib.suppress(OSError):  # no heartbeat write lands after the delete
            if self.file is None:
                if self._ours():
                    self.target.fs.delete_file(self.target.path)
                return
            seen = self.file.read()  # its version, not ours: a write whose reply was lost landed
            if self._is_mine(self._parse(seen)):
                self.file.delete(seen.version)  # only if no one took it over meanwhile

    def holder(self) -> Holder | None:
        """The lease as stored (None when absent or unreadable)."""
        return self._parse(self.file.read() if self.file is not None else read_text(self.target))

    def _parse(self, seen: Versioned | str | None) -> Holder | None:
        text = seen.text if isinstance(seen, Versioned) else seen
        try:
            return Holder(**json.loads(text)) if text else None
        except (ValueError, TypeError):
            log.warning("%s/%s is unreadable: taking it over", self.location, LEASE)
            return None

    def _is_mine(self, holder: Holder | None) -> bool:
        return holder is not None and holder.token == self.mine.token

    def _ours(self) -> bool:
        return self._is_mine(self.holder())

    def _other_live(self, other: Holder | None) -> bool:
        return other is not None and other.token != self.mine.token and other.live(self.ttl)

    def refuse_if_held(self) -> None:
        """Raise `LeaseHeld`, one line, when another live job holds the lease."""
        other = self.holder()
        if not self._other_live(other):
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.started))
        raise LeaseHeld(
            f"{self.where} is in use by another {other.what} (host {other.host}, "
            f"pid {other.pid}, since {since}); retry when it has finished"
        )

    def _text(self) -> str:
        return json.dumps(asdict(self.mine) | {"heartbeat": time.time()})

    def _refresh(self) -> bool:
        """Write a fresh heartbeat if the lease is still ours: False when another job took it over."""
        if self.file is None:
            if not self._ours():
                return False
            write_text_atomically(self.target, self._text())
            return True
        version = self.file.refresh(self._text(), self.version)
        if version is None:  # changed: still ours if it was our own write whose reply was lost
            seen = self.file.read()
            if not self._is_mine(self._parse(seen)):
                return False
            version = seen.version
        self.version = version
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    if not self._refresh():
                        self.lost = True  # taken over (we looked stale): never overwrite the new holder
                        return
                except OSError as err:  # storage away for a moment: the next beat retries
                    log.debug("lease heartbeat on %s failed: %s", self.location, err)


def ensure_free(location: Location) -> None:
    """Raise `LeaseHeld` when a live job holds `location`'s lease (a cheap early look, taking nothing)."""
    Lease(location, "check").refuse_if_held()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or no pid we can test): trust the heartbeat
    return True
