"""The database component: the configured DSN, or an embedded server the daemon owns,
migrated before anything else starts (with ``database.listen_port``, also listening on
loopback for the dashboards' read-only role, made at each start)."""

from __future__ import annotations

import trio

from ..config import Config
from ..errors import EmbeddedPostgresError
from ..logs import bind, get_logger
from ..runtime.lifeline import how, run_child
from .embedded import DEFAULT_PORT, EmbeddedPostgres
from .postgres import PostgresStore
from .reader import READER_ROLE, READER_TABLES, ensure_reader


def embedded_server(config: Config, *, listen: bool = True) -> EmbeddedPostgres:
    """The embedded server of the config's state directory; `listen`: with its TCP
    listener when ``database.listen_port`` asks for one (the socket's name follows the
    port either way, so that ``db status`` finds a running daemon's server)."""
    db = config.database
    return EmbeddedPostgres(
        config.state_path / "postgres",
        port=db.listen_port or DEFAULT_PORT,
        listen_host=db.listen_host if listen and db.listen_port else None,
    )


async def migrate(config: Config, dsn: str) -> list[int]:
    store = PostgresStore.from_config(config, dsn, application_name="userstreamd-migrate")
    try:
        return await trio.to_thread.run_sync(store.migrate)
    finally:
        store.close()


async def run_database(config: Config, *, task_status: trio.TaskStatus[str]) -> None:
    """Provide a migrated database; with an embedded server, raise if the server exits."""
    bind(component="database")
    log = get_logger()
    if config.database.dsn:
        applied = await migrate(config, config.database.dsn)
        log.info("database.ready", migrations_applied=applied, embedded=False)
        task_status.started(config.database.dsn)
        await trio.sleep_forever()
    embedded = embedded_server(config)
    if await trio.to_thread.run_sync(embedded.prepare):
        log.info("database.initialised", data_dir=str(embedded.data_dir))
    proc: trio.Process | None = None
    command = await trio.to_thread.run_sync(embedded.command)  # (may stop what is left)
    try:
        async with trio.open_nursery() as nursery:
            with embedded.log_path.open("ab") as server_log:
                proc = await run_child(
                    nursery,
                    command,
                    stop_timeout_s=35,
                    **embedded.process_options(server_log),
                )
            log.info("database.embedded_started", pid=proc.pid, data_dir=str(embedded.data_dir))
            await trio.to_thread.run_sync(embedded.wait_ready, proc)
            applied = await migrate(config, embedded.dsn)
            if embedded.listen_host:
                password = config.reader_password()
                if password is None:  # (the topology's preflight says so before the start)
                    raise EmbeddedPostgresError(f"no password for the role {READER_ROLE!r}")
                await trio.to_thread.run_sync(ensure_reader, embedded.dsn, password)
                log.info(
                    "database.listening",
                    host=embedded.listen_host,
                    port=embedded.port,
                    role=READER_ROLE,
                    tables=list(READER_TABLES),
                )
            log.info("database.ready", migrations_applied=applied, embedded=True)
            task_status.started(embedded.dsn)
            code = await proc.wait()
            raise RuntimeError(f"embedded postgres {how(code)}")
    finally:
        if proc is not None and proc.returncode is not None:
            log.info("database.embedded_stopped", exit_code=proc.returncode)
