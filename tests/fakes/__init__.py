"""In-process fakes of external services that cannot run on the development machine (Kafka Connect, Schema Registry)."""
