"""The daemon's life cycle: supervision, child processes, systemd."""
