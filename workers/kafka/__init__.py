"""Everything that talks to Kafka: client configs, topic admin, offsets and the worker loop."""
