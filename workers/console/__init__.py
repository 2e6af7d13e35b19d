"""The review console: a small ASGI app where reviewers label the posts the engines could not settle.

``settings`` (its configuration), ``store`` (the durable queue, claims and labels in Redis), ``ingest``
(builds the queue from the verdicts / dead-letter / alerts / reviews topics), ``app`` (Starlette pages,
auth, CSRF), ``server`` (runs ingester + app).
"""
