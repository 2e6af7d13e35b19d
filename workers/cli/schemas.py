"""``guardstream schemas``: write the events' JSON Schemas."""

from __future__ import annotations

from workers.cli.base import app


@app.command()
def schemas() -> int:
    """Write the JSON Schema files of the events to schemas/json/."""
    from schemas.export import main

    main()
    return 0
