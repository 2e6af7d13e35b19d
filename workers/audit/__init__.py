"""Audits of past verdicts: replay a topic through an engine and report the differences."""
