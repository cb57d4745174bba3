"""A consumer's pull from the group's durable consumer: messages taken as they arrive.

nats-py's ``fetch(n)`` returns when it has *n* messages or its timeout passed, so a
consumer fetching one at a time pays a request round trip per batch and, at low rates,
lingers for more. `Pull` does what JetStream's own clients call *consume*: it keeps one
pull request for up to `batch` messages outstanding at the durable consumer (a new one
for what is missing once half of it came), the server sends each message to our inbox
the moment it is stored, and `Pull.take` hands over whatever came since the last call
(waiting up to FETCH_WAIT_S for a first). Between two takes the messages wait in our
inbox, counted in the group's ``MaxAckPending`` like any delivered message.

The server's answers on the inbox besides messages (status messages):

- *100 Idle Heartbeat*: every HEARTBEAT_S while a request waits with nothing to send;
  nothing heard for SILENT_AFTER_S (a node lost, a reconnect: the request died with its
  connection) is a `TimeoutError`, and a new request goes out;
- *408 Request Timeout*: a request expired (after EXPIRES_S) with
  ``Nats-Pending-Messages`` of its messages unsent: no longer outstanding;
- anything else (*409 Consumer Deleted*, *409 Leadership Change*, *503 No Responders*:
  no consumer by that name): `PullError`, after the messages that came before it are
  taken; nothing is counted outstanding any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import nats.errors

from .bus import Bus

FETCH_WAIT_S = 1.0  # the longest a take waits for a first message
EXPIRES_S = 5.0  # a pull request's life at the server
HEARTBEAT_S = 1.0  # the server's sign of life while a request waits
SILENT_AFTER_S = 3 * HEARTBEAT_S


class PullError(nats.errors.Error):
    """The server ended our pull requests (the durable deleted, a leader change)."""


class Pull:
    """(On the client's loop.) The group's durable consumer `group`, pulled `batch` at a
    time into an inbox of our own."""

    def __init__(self, bus: Bus, group: str, batch: int) -> None:
        self.bus = bus
        self.batch = batch
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{bus.stream}.{group}"
        self.inbox = bus.nc.new_inbox()
        self.outstanding = 0  # messages asked for and not yet come (nor expired)
        self._request = json.dumps(
            {"expires": int(EXPIRES_S * 1e9), "idle_heartbeat": int(HEARTBEAT_S * 1e9)}
        )
        self._items: list[Any] = []
        self._arrived = asyncio.Event()
        self._heard_at = 0.0
        self._failed = ""  # (a failure that came after messages: raised at the next take)
        self._subscription: Any = None

    async def start(self) -> None:
        self._subscription = await self.bus.nc.subscribe(self.inbox, cb=self._deliver)
        self._heard_at = asyncio.get_running_loop().time()

    async def stop(self) -> list[Any]:
        """Unsubscribe; the messages come and not yet taken (to give them back)."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
        items, self._items = self._items, []
        return [msg for msg in items if msg.data]

    async def _deliver(self, msg: Any) -> None:
        self._items.append(msg)
        self._arrived.set()

    async def take(self) -> list[Any]:
        """The messages come since the last take (at most about 1.5 `batch`); [] when
        none came within FETCH_WAIT_S. `PullError` or `TimeoutError` as above."""
        loop = asyncio.get_running_loop()
        if self._failed:
            failure, self._failed = self._failed, ""
            raise PullError(failure)
        if self.outstanding <= self.batch // 2:
            ask = self.batch - self.outstanding
            payload = self._request[:-1] + f', "batch": {ask}}}'
            await self.bus.nc.publish(self.subject, payload.encode(), reply=self.inbox)
            if self.outstanding == 0:  # (the silence is counted from the first request)
                self._heard_at = loop.time()
            self.outstanding = self.batch
        if not self._items:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), FETCH_WAIT_S)
        items, self._items = self._items, []
        messages, failure = [], ""
        for msg in items:
            status = msg.headers.get("Status") if msg.headers and not msg.data else None
            if status is None:
                messages.append(msg)
                self.outstanding -= 1
            elif status == "408" or status == "404":
                unsent = msg.headers.get("Nats-Pending-Messages")
                self.outstanding -= int(unsent) if unsent else self.outstanding
            elif status != "100":
                failure = f"{status} {msg.headers.get('Description', '')}".split("\n")[0].strip()
        self.outstanding = max(self.outstanding, 0)
        if items:
            self._heard_at = loop.time()
        if failure:
            self.outstanding = 0
            if not messages:
                raise PullError(failure)
            self._failed = failure
        elif not messages and loop.time() - self._heard_at > SILENT_AFTER_S:
            self.outstanding = 0
            raise TimeoutError(f"nothing heard from the server for {SILENT_AFTER_S:g} s")
        return messages
