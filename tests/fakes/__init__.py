"""In-process fakes of external services that cannot run on the development machine (Kafka Connect, Schema Registry),
and a Faust topic stand-in for unit tests of the processor shells."""
