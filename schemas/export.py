"""Write the JSON Schema files: ``python -m schemas.export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.events import json_schemas

OUT_DIR = Path(__file__).resolve().parent / "json"


def render() -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(s, indent=2, sort_keys=True) + "\n" for name, s in json_schemas().items()
    }


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for fname, text in render().items():
        (OUT_DIR / fname).write_text(text)
        sys.stdout.write(f"{OUT_DIR / fname}\n")


if __name__ == "__main__":
    main()
