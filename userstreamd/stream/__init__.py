"""The stream itself: the wire protocol, the records, the hub, the one stream client."""
