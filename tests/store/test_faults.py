"""Database errors classified by SQLSTATE: what retrying can cure, what is the row's."""

from __future__ import annotations

import pytest

from userstreamd.store.faults import classify


@pytest.mark.parametrize(
    ("sqlstate", "fault"),
    [
        (None, "transient"),  # no answer at all: the connection failed
        ("25006", "transient"),  # read_only_sql_transaction: a hot standby, a failover
        ("57P01", "transient"),  # admin_shutdown
        ("57P02", "transient"),  # crash_shutdown
        ("57P03", "transient"),  # cannot_connect_now: starting up, or in recovery
        ("57P05", "transient"),  # idle_session_timeout
        ("08000", "transient"),  # connection_exception
        ("08006", "transient"),  # connection_failure
        ("08P01", "transient"),  # protocol_violation (class 08)
        ("40001", "transient"),  # serialization_failure (a standby's recovery conflict too)
        ("40P01", "transient"),  # deadlock_detected
        ("53000", "transient"),  # insufficient_resources
        ("53100", "transient"),  # disk_full
        ("53200", "transient"),  # out_of_memory
        ("53300", "transient"),  # too_many_connections
        ("55P03", "transient"),  # lock_not_available
        ("57014", "transient"),  # query_canceled: statement_timeout
        ("22001", "row"),  # string_data_right_truncation
        ("22P02", "row"),  # invalid_text_representation
        ("22021", "row"),  # character_not_in_repertoire
        ("23505", "row"),  # unique_violation
        ("23514", "row"),  # check_violation
        ("23502", "row"),  # not_null_violation
        ("25001", "unknown"),  # active_sql_transaction: not the row's, not the moment's
        ("40002", "unknown"),  # transaction_integrity_constraint_violation
        ("42P01", "unknown"),  # undefined_table: an operator dropped it
        ("42501", "unknown"),  # insufficient_privilege: a revoked grant
        ("55000", "unknown"),  # object_not_in_prerequisite_state
        ("57P04", "unknown"),  # database_dropped
        ("58030", "unknown"),  # io_error
        ("XX000", "unknown"),  # internal_error
        ("XX001", "unknown"),  # data_corrupted: the table's, not the row's
    ],
)
def test_a_sqlstate_is_transient_the_rows_fault_or_unknown(
    sqlstate: str | None, fault: str
) -> None:
    assert classify(sqlstate) == fault
