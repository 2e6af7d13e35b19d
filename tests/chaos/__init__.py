"""Chaos tests: killed workers, broker and S3/Redis outages, poison pills and memory bounds."""
