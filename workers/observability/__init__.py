"""Metrics, build info and logging for the worker and the tools."""
