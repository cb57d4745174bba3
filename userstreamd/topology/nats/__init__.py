"""NATS JetStream: the replicated log behind userstreamd, and a local cluster to test it on."""
