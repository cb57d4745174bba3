"""The NATS bus's WebSocket groups' consumers against the local cluster (the groups'
behaviour, the same on both buses, is in tests/test_group_contract.py)."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from userstreamd.topology.nats.bus import open_bus
from userstreamd.topology.nats.groups import _ensure, consumer_config, consumer_name

pytestmark = pytest.mark.cluster


def test_a_groups_consumer_is_named_apart_from_the_daemons_own() -> None:
    # (`~` is in no group name, so no ``consumers.group`` can be one of these)
    assert consumer_name("audit") == "ws~audit"
    assert consumer_name("eu.audit") == "ws~eu~audit"
    assert consumer_name("eu.audit") != consumer_name("eu_audit")


async def test_an_ad_hoc_groups_consumer_expires_and_stays_once_the_group_is_named(
    nats_config: Any,
) -> None:
    ad_hoc = nats_config(
        broadcaster={"allow_ad_hoc_groups": True, "ad_hoc_group_grace_s": 7.0},
        cluster={"ack_wait_s": 11.0},
    )
    named = nats_config(broadcaster={"groups": ["x.y"], "group_lag_max": 500})
    name = consumer_name("x.y")
    async with open_bus(ad_hoc, "test") as bus:
        await bus.call(_ensure, bus, name, consumer_config(bus, ad_hoc, "x.y"))
        info = await bus.call(bus.js.consumer_info, bus.stream, name)
        assert (info.config.inactive_threshold, info.config.ack_wait) == (7.0, 11.0)
        assert info.config.deliver_policy == DeliverPolicy.NEW
        await bus.call(_ensure, bus, name, consumer_config(bus, named, "x.y"))
        info = await bus.call(bus.js.consumer_info, bus.stream, name)
        assert not info.config.inactive_threshold
        assert info.config.max_ack_pending == 500
