"""Integration tests against the real broker, S3 server and Redis that tests/conftest.py starts."""
