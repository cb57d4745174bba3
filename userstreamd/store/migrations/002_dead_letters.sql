-- Records that failed validation: kept with the reason, never in incoming_users.
CREATE TABLE dead_letters (
    id          bigserial   PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    source      text        NOT NULL,
    position    bigint,
    error       text        NOT NULL,
    raw         jsonb       NOT NULL
);

CREATE INDEX dead_letters_received_at_idx ON dead_letters (received_at);
