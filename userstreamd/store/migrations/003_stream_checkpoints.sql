-- The stream's history, so a restart resumes instead of starting over.
-- streams: one row per epoch, with what regenerates it (seed and source).
CREATE TABLE streams (
    epoch      text        PRIMARY KEY,
    seed       text        NOT NULL,
    source     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- stream_checkpoints: per consumer group and epoch, the seq (and source position)
-- through which every user is committed. Written in the same transaction as the rows.
CREATE TABLE stream_checkpoints (
    group_name text        NOT NULL,
    epoch      text        NOT NULL,
    seq        bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, epoch)
);
