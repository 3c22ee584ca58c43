"""What other servers sharing the database changed, pushed to this one as it happens.

Why a feed: replicas must not wait for a poll to apply a label made elsewhere. A database that
can push (PostgreSQL's LISTEN/NOTIFY) publishes every label change and committed fit here; the
serving layer subscribes and rebuilds the affected model's Guard at once. `None` is published
when changes may have been missed (the listening connection was lost and is back): every
subscriber then checks its model. SQLite cannot push; its store has no feed and servers poll.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("spurguard.server")


@dataclass(frozen=True)
class Change:
    """The labels or the current fit of one (model, digest) changed; `fit_id` is the fit concerned."""

    model: str
    digest: str
    fit_id: str


Subscriber = Callable[[Change | None], None]


class ChangeFeed:
    """Subscribers called, on the publisher's thread, with each Change (or None: check everything)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber` for every change from now on; returns what unsubscribes it. It must
        return quickly (hand the work to another thread): it holds up the next change."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, change: Change | None) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(change)
            except Exception:  # noqa: BLE001 - one bad subscriber must not starve the others
                log.exception("a store change subscriber failed")
