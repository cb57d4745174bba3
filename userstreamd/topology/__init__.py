"""Where the stream lives: the embedded hub or a NATS JetStream cluster."""
