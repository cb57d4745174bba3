-- History: a client resuming from before the replay buffer reads the stored stream
-- (store.history). A user's frame needs its source position; a dead-lettered seq is
-- reported in its place, found by (epoch, seq). Rows stored before this have neither:
-- their position reads as 0, their dead letters as "not stored".
ALTER TABLE incoming_users ADD COLUMN IF NOT EXISTS position bigint;

ALTER TABLE dead_letters ADD COLUMN epoch text;

CREATE INDEX dead_letters_epoch_seq_idx ON dead_letters (epoch, seq) WHERE seq IS NOT NULL;
