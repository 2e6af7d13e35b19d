"""Unit tests: no broker, S3 or Redis (subprocesses and in-process stand-ins are fine)."""
