"""The ``guardstream`` command line (Typer).

One module per command, named after it (``worker``, ``up``, ``demo``, ``check``, ``replay``,
``audit_export``, ``review``, ``export_training``, ``redrive``, ``console``, ``alerts``, ``clusters``,
``produce``, ``tail``, ``schemas``; ``topics`` is the ``topics create`` group); tables live in ``render``;
shared options, the settings file and errors in ``base``; ``--from``/``--to`` parsing in ``bounds``.
``main`` turns a bad value into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer
from confluent_kafka import KafkaException

from schemas.errors import FatalError
from schemas.extras import MissingExtra

# every command module registers itself on `app` when imported
from workers.cli import (  # noqa: F401
    alerts,
    audit_export,
    check,
    clusters,
    console,
    demo,
    export_training,
    produce,
    redrive,
    replay,
    review,
    root,
    schemas,
    tail,
    topics,
    up,
    worker,
)
from workers.cli.base import ClickException, CliError, UsageError, app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (``sys.exit(main())``).

    Usage errors (a bad flag value, a missing option) are one line and exit 2; a refused request
    (``CliError``) is one line and exit 1, raised as ``SystemExit(message)``; a missing optional
    dependency (``MissingExtra``, from any command) is one line naming the ``pip install`` and exit 2; a
    ``FatalError`` (a topic the broker refuses to create, a dependency past its deadline) is one line and
    its own ``exit_code``.
    Every such line says ``error:`` so scripts and people can tell it from log output."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="guardstream", standalone_mode=False)
    except CliError as exc:
        raise SystemExit(f"guardstream: error: {exc.format_message()}") from None
    except UsageError as exc:
        if not exc.format_message():  # `guardstream` / `guardstream topics` alone: the help was shown
            return 2
        sub = exc.ctx.command_path if exc.ctx is not None else "guardstream"
        print(f"{sub}: error: {exc.format_message()} (see {sub} --help)", file=sys.stderr)
        return 2
    except ClickException as exc:
        print(f"guardstream: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except MissingExtra as exc:  # an optional dependency: the pip install to run, no traceback
        print(f"guardstream: error: {exc}", file=sys.stderr)
        return 2
    except FatalError as exc:  # what to do next is in the message; the exit code says which kind
        print(f"guardstream: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        return 130
    except KafkaException as exc:  # an unreachable or refusing broker: a fact about the deployment
        print(
            f"guardstream: error: Kafka: {exc.args[0] if exc.args else exc} "
            "(check --bootstrap-servers / GUARDSTREAM_BOOTSTRAP_SERVERS and GUARDSTREAM_KAFKA_EXTRA)",
            file=sys.stderr,
        )
        return 3
    return int(rv or 0)
