"""userstreamd: random users, streamed from an API over WebSocket into PostgreSQL."""

__version__ = "0.1.0"
