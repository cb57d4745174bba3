"""A 3-node JetStream cluster shared by the tests that do not kill its nodes (each test
gets a stream of its own); the ones that do start their own (`LocalCluster`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_config
from userstreamd.config import Config, load_config
from userstreamd.testing.nats import LocalCluster

_streams = itertools.count(1)


@pytest.fixture(scope="session")
def nats_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with LocalCluster(tmp_path_factory.mktemp("nats")) as cluster:
        yield cluster.urls


@pytest.fixture
def nats_config(tmp_path: Path, dsn: str, nats_urls: list[str]) -> Any:
    """make(**tables): a config on the shared cluster, with a stream of this test's own."""
    stream = f"T{next(_streams)}"

    def make(**tables: dict[str, Any]) -> Config:
        cluster = {"bus": "nats", "servers": nats_urls, "stream": stream, "lease_ttl_s": 2.0}
        merged = {**tables}
        merged["producer"] = {"source": "synthetic", **tables.get("producer", {})}
        merged["cluster"] = {**cluster, **tables.get("cluster", {})}
        return load_config(write_config(tmp_path, dsn, **merged))

    return make
