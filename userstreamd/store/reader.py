"""The read-only role the dashboards use on the embedded server (``grafana``).

With ``database.listen_port`` set, the embedded server also listens on that loopback
port, where only this role may log in, with a password (scram-sha-256; the server's own
superuser stays on the Unix socket). At each start `ensure_reader` makes the role
exactly this, whatever it was: LOGIN with the configured password, no other attribute,
SELECT on `READER_TABLES` (what ``grafana/realtime_users.json`` reads) and nothing else:
no write, no CREATE in the schema, no temporary table.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

READER_ROLE = "grafana"
READER_TABLES = ("incoming_users", "dead_letters")
CONNECTION_LIMIT = 10  # Grafana pools its connections; the daemon keeps the rest
STATEMENT_TIMEOUT = "10s"  # a dashboard's query never holds the daemon's server longer


def hba_lines(database: str) -> list[str]:
    """pg_hba.conf: the Unix socket trusted (as before), TCP only for the reader."""
    return [
        "local all all trust",
        f"host {database} {READER_ROLE} 127.0.0.1/32 scram-sha-256",
        f"host {database} {READER_ROLE} ::1/128 scram-sha-256",
    ]


def ensure_reader(dsn: str, password: str) -> None:
    """Create or update the role, in one transaction (run as the server's superuser)."""
    role = sql.Identifier(READER_ROLE)
    tables = sql.SQL(", ").join(map(sql.Identifier, READER_TABLES))
    with psycopg.connect(dsn) as conn:
        database = sql.Identifier(conn.info.dbname)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {}").format(role))
        for statement in (
            "ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
            "NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {limit} PASSWORD {password}",
            "ALTER ROLE {role} SET statement_timeout = {timeout}",
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
            "REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}",
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            "REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC",
            "GRANT CONNECT ON DATABASE {database} TO {role}",
            "GRANT USAGE ON SCHEMA public TO {role}",
            "GRANT SELECT ON {tables} TO {role}",
        ):
            conn.execute(
                sql.SQL(statement).format(
                    role=role,
                    limit=sql.Literal(CONNECTION_LIMIT),
                    password=sql.Literal(password),
                    timeout=sql.Literal(STATEMENT_TIMEOUT),
                    database=database,
                    tables=tables,
                )
            )
