-- One user per stream position. A restart regenerates the positions after the stored
-- checkpoint; when the source that serves them differs from the first time (the API
-- instead of the synthetic fallback, or back), the same (epoch, seq) got a second user
-- under another uuid. Keep the first one stored (earliest received_at, then lowest uuid),
-- drop the others, and let the unique index refuse such a second user from now on.
DELETE FROM incoming_users AS later
USING incoming_users AS first
WHERE later.epoch = first.epoch
  AND later.seq = first.seq
  AND (later.received_at, later.uuid) > (first.received_at, first.uuid);

CREATE UNIQUE INDEX incoming_users_epoch_seq_key ON incoming_users (epoch, seq);

-- A row the database refused is a dead letter with its stream seq (its source position
-- is not known to the consumer); a record the producer could not validate has a position.
ALTER TABLE dead_letters ADD COLUMN seq bigint;
