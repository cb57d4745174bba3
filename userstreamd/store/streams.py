"""Where the stream starts and where it stopped: epochs and the consumer group's
checkpoint, read at start-up and written once more when the daemon drains."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import trio

from ..config import Config
from ..logs import get_logger
from .postgres import PostgresStore, StreamCheckpoint


@dataclass(frozen=True)
class Stream:
    """The epoch, the seed that regenerates it, and the last (seq, source position) its
    consumer group committed."""

    epoch: str
    seed: str
    seq: int
    position: int
    resumed: bool

    @classmethod
    def new(cls, seed: str = "") -> Stream:
        epoch = uuid.uuid4().hex[:16]
        return cls(epoch, seed or epoch, 0, 0, resumed=False)


def _store(config: Config, dsn: str) -> PostgresStore:
    return PostgresStore.from_config(config, dsn, application_name="userstreamd")


def open_stream(config: Config, dsn: str) -> Stream:
    """Resume the stream from the consumer group's last checkpoint, or begin a new epoch.

    Resuming needs the same source and seed (an empty configured seed accepts the stored
    one); the producer then regenerates everything after the checkpoint's position."""
    p = config.producer
    store = _store(config, dsn)
    log = get_logger()
    try:
        found = store.last_checkpoint(config.consumers.group)
        if found is not None:
            checkpoint, seed, source = found
            if source == p.source and p.seed in ("", seed):
                log.info(
                    "daemon.stream_resumed",
                    epoch=checkpoint.epoch,
                    seq=checkpoint.seq,
                    position=checkpoint.position,
                    seed=seed,
                )
                return Stream(
                    checkpoint.epoch, seed, checkpoint.seq, checkpoint.position, resumed=True
                )
            log.info(
                "daemon.stream_not_resumed", epoch=checkpoint.epoch, reason="source or seed changed"
            )
        stream = Stream.new(p.seed)
        store.begin_stream(stream.epoch, stream.seed, p.source)
        log.info("daemon.stream_started", epoch=stream.epoch, seed=stream.seed, source=p.source)
        return stream
    finally:
        store.close()


def record_stream(config: Config, dsn: str, epoch: str, seed: str, source: str) -> None:
    """Record an epoch that began elsewhere (the NATS bus's), once."""
    store = _store(config, dsn)
    try:
        store.begin_stream(epoch, seed, source)
    finally:
        store.close()


async def save_checkpoint(config: Config, dsn: str, checkpoint: StreamCheckpoint) -> None:
    """Store the group's checkpoint (the consumers write one with each batch, so the
    stored one lags; after a drain the daemon writes the final one)."""

    def work() -> None:
        store = _store(config, dsn)
        try:
            store.insert_users([], checkpoint)
        finally:
            store.close()

    await trio.to_thread.run_sync(work)
