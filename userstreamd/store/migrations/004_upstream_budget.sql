-- What the upstream API served, so that a restart inside its rate-limit window remembers:
-- the API counts the users it serves per client and window, not per process.
-- One row per served request; rows older than the window are pruned as new ones arrive.
CREATE TABLE upstream_budget (
    url      text        NOT NULL,
    spent_at timestamptz NOT NULL,
    users    integer     NOT NULL CHECK (users > 0)
);

CREATE INDEX upstream_budget_url_spent_at_idx ON upstream_budget (url, spent_at);
