"""PostgreSQL: the embedded server, migrations and the batch writer."""
