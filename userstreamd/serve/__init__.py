"""Serving the stream over WebSocket: edge, admission, auth, broadcaster, fan-out."""
