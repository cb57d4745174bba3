"""The NATS variant of the contract tests runs on the same shared 3-node cluster
fixtures as tests/cluster (imported, not copied: one definition of how a NATS config
is made). Only the ``nats`` case asks for them, so the other cases start no cluster."""

from tests.cluster.conftest import nats_config, nats_urls

__all__ = ["nats_config", "nats_urls"]
