"""The producer lease: which of several producers publishes.

One key (``producer``) in a JetStream key-value bucket ``<stream>_lease`` whose entries
live ``lease_ttl_s``, replicated like the stream. A producer takes the lease by creating
the key (only one create succeeds), keeps it by updating it at its revision every third
of the TTL, and gives it back by deleting it at its revision when it stops. A producer
that dies stops renewing; the key expires and a standby's create succeeds.

The lease keeps producers from competing; it is not what keeps the stream right. A
producer that lost its lease without knowing (paused, partitioned) can still publish
until it notices, but every publish expects the stream's last sequence (`outlet`): its
first publish after another producer's fails, and it stops. So the stream never gets a
position twice, or a hole.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import trio
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from ...logs import get_logger
from .bus import Bus

KEY = "producer"


class LeaseLost(Exception):
    """Another producer holds the lease now, or it could not be renewed in time."""


async def _bucket(bus: Bus) -> KeyValue:
    cl = bus.settings
    config = KeyValueConfig(
        bucket=f"{cl.stream}_lease",
        history=1,
        ttl=cl.lease_ttl_s,
        replicas=cl.replicas,
        storage=StorageType.FILE,
    )
    try:
        kv = await bus.js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await bus.js.create_key_value(config)
    # (lease_ttl_s changed since the bucket was made: its entries must live the new TTL,
    # or a holder renewing every third of it would lose it between two renewals)
    info = await bus.js.stream_info(f"KV_{config.bucket}")
    if round(info.config.max_age or 0, 3) != round(cl.lease_ttl_s, 3):
        await bus.js.update_stream(info.config.evolve(max_age=cl.lease_ttl_s))
    return kv


class _Held:
    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.lost: str | None = None


@contextlib.asynccontextmanager
async def hold_lease(bus: Bus, holder: str) -> AsyncIterator[None]:
    """Wait for the lease, then hold it while the block runs. If it is lost the block
    is cancelled and `LeaseLost` raised; when the block ends it is given back."""
    log = get_logger()
    ttl = bus.settings.lease_ttl_s
    kv = await bus.retrying("producer.lease_unavailable", _bucket, bus)
    standby_logged = False
    while (revision := await _try_create(bus, kv, holder)) is None:
        if not standby_logged:
            log.info("producer.standby", lease=f"{bus.stream}_lease")
            standby_logged = True
        await trio.sleep(ttl / 5)
    log.info("producer.lease_acquired", holder=holder, revision=revision)
    held = _Held(revision)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_renew, bus, kv, holder, held, nursery.cancel_scope)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if held.lost is None:
            await _release(bus, kv, holder, held.revision)
    if held.lost is not None:
        log.warning("producer.lease_lost", holder=holder, reason=held.lost)
        raise LeaseLost(held.lost)


async def _release(bus: Bus, kv: KeyValue, holder: str, revision: int) -> None:
    """Give the lease back (so that a standby takes over now, not at its expiry). A
    renewal cut short by the stop may have gone through unseen: then the key is ours at
    a newer revision, read back before deleting it."""
    log = get_logger()
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            try:
                await bus.call(kv.delete, KEY, revision)
            except nats.js.errors.BadRequestError:  # (wrong last sequence)
                ours = await _ours(bus, kv, holder)
                if ours is None:
                    log.info("producer.lease_not_ours", holder=holder)
                    return
                await bus.call(kv.delete, KEY, ours)
            log.info("producer.lease_released", holder=holder)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("producer.lease_not_released", error=f"{type(exc).__name__}: {exc}")


async def _ours(bus: Bus, kv: KeyValue, holder: str) -> int | None:
    """The lease's current revision if `holder` holds it, else None."""
    try:
        entry = await bus.call(kv.get, KEY)
    except nats.js.errors.NotFoundError:  # (expired, or deleted)
        return None
    return entry.revision if entry.value == holder.encode() else None


async def _try_create(bus: Bus, kv: KeyValue, holder: str) -> int | None:
    """The lease's revision if this create took it; None if someone holds it (or the
    cluster did not answer)."""
    try:
        return await bus.call(kv.create, KEY, holder.encode())
    except nats.js.errors.KeyWrongLastSequenceError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        get_logger().warning("producer.lease_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None


async def _renew(bus: Bus, kv: KeyValue, holder: str, held: _Held, scope: trio.CancelScope) -> None:
    """Update the key every third of the TTL; give up (cancelling `scope`) when another
    producer took it, or when it was not renewed within 80% of the TTL (by then the
    server may expire it any moment)."""
    ttl = bus.settings.lease_ttl_s
    renewed_at = trio.current_time()
    while True:
        await trio.sleep(ttl / 3)
        asked_at = trio.current_time()
        with trio.move_on_at(renewed_at + 0.8 * ttl):
            try:
                held.revision = await bus.call(kv.update, KEY, holder.encode(), held.revision)
                renewed_at = asked_at
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                # (or a renewal went through and its answer was lost: then it is ours)
                revision = await _ours(bus, kv, holder)
                if revision is not None:
                    held.revision, renewed_at = revision, asked_at
                    continue
                held.lost = "another producer holds it"
                scope.cancel()
                return
            except (nats.errors.Error, TimeoutError) as exc:
                get_logger().warning(
                    "producer.lease_not_renewed", error=f"{type(exc).__name__}: {exc}"
                )
        if trio.current_time() >= renewed_at + 0.8 * ttl:
            held.lost = f"not renewed within {0.8 * ttl:g} s"
            scope.cancel()
            return
