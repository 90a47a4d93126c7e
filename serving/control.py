"""Rollout control: the mode (production, shadow, canary), the canary share and the kill switch.

Start-up values come from the environment (SERVING_MODE, SERVING_CANARY_PERCENT,
SERVING_KILL_SWITCH); the control file (``<SERVING_HOME>/control.json``), written by the admin
endpoint or by hand, overrides them and is re-read within ``control_poll_seconds``: switching
mode or stopping answers needs no deploy and no restart, and every worker process sees it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import orjson

from serving.settings import MODES, ServingSettings


@dataclass(frozen=True)
class Control:
    mode: str
    canary_percent: float
    kill_switch: bool
    changed_by: str | None = None
    changed_at: str | None = None
    reason: str | None = None

    def validated(self) -> "Control":
        # strict types: a hand-edited "kill_switch": 0 or "canary_percent": "10" is unreadable,
        # and an unreadable control file keeps the kill switch engaged
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if not isinstance(self.kill_switch, bool):
            raise ValueError("kill_switch must be true or false")
        if isinstance(self.canary_percent, bool) or not isinstance(self.canary_percent, (int, float)) \
                or not 0 <= self.canary_percent <= 100:
            raise ValueError("canary_percent must be a number between 0 and 100")
        return replace(self, canary_percent=float(self.canary_percent))


def canary_bucket(routing_key: str) -> float:
    """A stable position in [0, 100) for a routing key (a pseudonymous patient key or a care
    unit): the same patient always gets the same model during a canary."""
    digest = hashlib.sha256(b"canary/" + routing_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class ControlState:
    def __init__(self, settings: ServingSettings):
        self.path = settings.control_path
        self.poll_seconds = settings.control_poll_seconds
        self._defaults = Control(settings.mode, settings.canary_percent, settings.kill_switch)
        self._current = self._defaults
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    @property
    def current(self) -> Control:
        now = time.monotonic()
        if now - self._checked >= self.poll_seconds:
            self._checked = now
            self._refresh()
        return self._current

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # os.replace makes a new inode
        except FileNotFoundError:
            self._current, self._stamp = self._defaults, None
            return
        if stamp == self._stamp:
            return
        try:
            data = orjson.loads(self.path.read_bytes())
            self._current = Control(**{**asdict(self._defaults), **data}).validated()
        except (ValueError, TypeError):
            # a broken control file must not re-enable a killed model: fail closed
            self._current = replace(self._defaults, kill_switch=True, reason="control file unreadable")
        self._stamp = stamp

    def update(self, changed_by: str, reason: str | None, **changes) -> Control:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one writer at a time across workers, each starting from the file as it is now: a
        # change made elsewhere within the poll interval (a kill switch) is never written back
        with self._lock, open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refresh()
            base = self._current
            new = replace(base, **{k: v for k, v in changes.items() if v is not None}, changed_by=changed_by,
                          reason=reason, changed_at=datetime.now(timezone.utc).isoformat(timespec="seconds")).validated()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_bytes(orjson.dumps(asdict(new), option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
            self._checked = 0.0
            return self.current
