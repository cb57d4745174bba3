-- The table the consumers write and the dashboard reads.
-- login.uuid is the key: the same user inserted twice is one row.
CREATE TABLE incoming_users (
    uuid            uuid PRIMARY KEY,
    seq             bigint      NOT NULL,
    epoch           text        NOT NULL,
    source          text        NOT NULL,
    gender          text,
    title           text,
    first_name      text,
    last_name       text,
    email           text,
    username        text,
    phone           text,
    cell            text,
    street_number   integer,
    street_name     text,
    city            text,
    state           text,
    country         text,
    postcode        text,
    latitude        double precision,
    longitude       double precision,
    timezone_offset text,
    dob             timestamptz,
    age             integer,
    registered      timestamptz,
    id_name         text,
    id_value        text,
    nat             text,
    picture_large   text,
    picture_medium  text,
    picture_thumb   text,
    produced_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    raw             jsonb       NOT NULL
);

CREATE INDEX incoming_users_created_at_idx ON incoming_users (created_at);
CREATE INDEX incoming_users_country_idx ON incoming_users (country);
