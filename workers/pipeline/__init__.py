"""The transport-free moderation pipeline: decode, cache, fetch media, judge, and the outputs to publish.

No Kafka here: the Kafka worker in ``workers.kafka`` drives it."""
