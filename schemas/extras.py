"""Optional dependencies: one line that names the ``pip install`` to run when an extra is missing.

The core package is the worker's own dependencies (Kafka, S3, Redis, the schemas); engines, the local
stack, the alerts app and training live in extras (pyproject.toml). Import sites of an extra's modules
call ``require(extra, module)`` instead of importing directly. It lives in ``schemas`` (which depends on
nothing of guardstream) so that ``guard``, ``workers``, ``infra`` and ``training`` can all use it without
breaking the dependency direction.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# What each extra is for, for the message (keep in step with pyproject.toml).
EXTRAS = {
    "cpu": "the MiniLM CPU engine (torch, transformers, sentence-transformers)",
    "gpu": "the in-process vLLM engine",
    "local": "the embedded local stack (Tansu broker, moto S3 server)",
    "console": "the review console (starlette, uvicorn, jinja2)",
    "alerts": "the emerging-risk alerts app (faust-streaming + the MiniLM embedder)",
    "train": "the retraining loop (TRL, datasets, pyarrow)",
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed. ``str()`` is the one line to show the user."""

    def __init__(self, extra: str, module: str) -> None:
        self.extra, self.module = extra, module
        what = EXTRAS.get(extra, f"the {extra} extra")
        super().__init__(
            f"{module} is not installed; it is needed for {what}: pip install 'guardstream[{extra}]'",
            name=module,
        )


def require(extra: str, module: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtra`` naming ``pip install 'guardstream[extra]'``.

    Any ImportError while importing ``module`` (it is missing, blocked, or one of its own dependencies is
    missing, e.g. torch under sentence-transformers) becomes ``MissingExtra``, with the original chained.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # ModuleNotFoundError, or sys.modules[name] = None (blocked)
        raise MissingExtra(extra, module) from exc
