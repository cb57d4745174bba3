"""Consuming the stream into PostgreSQL: batches, commits, acknowledgements."""
