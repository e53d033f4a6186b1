"""The command line's one error boundary: what a user sees when something goes wrong.

Every command runs inside :class:`FedmetaGroup`, so no exception reaches
typer's pretty traceback (which prints local variables: data rows, weights).

- A bad option or argument: one line naming it, exit 2.
- An error the user can fix (a bad file, column, row, option value, an
  unknown version, a missing site home): one line, exit 2.
- A failed integrity check (a file whose hash differs from the registry's):
  one line, exit 1.
- Anything else: ``internal error: <type>: <message>`` with quoted values and
  numbers blanked out, plus a hint to rerun with ``FEDMETA_DEBUG=1``, which
  adds Python's plain traceback (never local variables). Exit 1.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from fedmeta.cli.output import console

DEBUG_ENV = "FEDMETA_DEBUG"


class UsageProblem(click.ClickException):
    """A user error found by a command itself (a bad value, file, column or row): one line, exit 2."""

    exit_code = 2


_CELL_VALUE = re.compile(r"(, got|unknown category|unknown class) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^;]*?)(?=;|$)")
_INPUT_VALUE = re.compile(r",? ?input_value=.*?(?=, input_type=|\]|$)")


def without_values(message: str) -> str:
    """The first line of an error message, with any cell value it quotes from a user's file left out.

    Errors name the file, column and row; the value itself may be a patient's.

    >>> without_values("site.csv: column 'age' row 7: expected a number, got 'Jane Doe'")
    "site.csv: column 'age' row 7: expected a number, got (value not shown)"
    >>> without_values("x.csv: column 'ward' row 3: unknown category 'ICU-2'; known: ['a', 'b']")
    "x.csv: column 'ward' row 3: unknown category (value not shown); known: ['a', 'b']"
    """
    first = (message.strip().splitlines() or [""])[0]
    first = _INPUT_VALUE.sub("", first)
    return _CELL_VALUE.sub(r"\1 (value not shown)", first) if " row " in first else first


def fail(error: Exception | str, code: int = 2) -> typer.Exit:
    """Print ``error`` as one red line (file, column and row, never a cell's value); returns the exit to raise.

    An error that names several files (``lines``, as :class:`~fedmeta.data.schema.SchemaProblems` does) is one line per file.
    """
    for line in getattr(error, "lines", None) or [str(error)]:
        console.print(f"[red]error:[/] {escape(without_values(str(line)))}", soft_wrap=True)
    return typer.Exit(code)


def _imported(classes: tuple[tuple[str, str], ...]) -> tuple[type[Exception], ...]:
    """The exception classes ``(module, name)`` whose module is already imported.

    An error of a class no code has imported cannot have been raised, so nothing is imported here: importing a
    layer only to learn that cost every error of a command that never touched it a second and a half (the
    personalize layer imports torch and onnx). A layer that is not installed (the training extra) raises none.
    """
    errors: list[type[Exception]] = []
    for module, name in classes:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            errors.append(cls)
    return tuple(errors)


def user_errors() -> tuple[type[Exception], ...]:
    return _imported((
        ("fedmeta.data", "SchemaError"), ("fedmeta.fl.config", "ConfigError"), ("fedmeta.personalize", "PersonalizationError"),
        ("fedmeta.registry", "RegistryError"), ("fedmeta.trained", "ModelMismatchError"), ("serving.policy", "PolicyError"),
    ))


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (taken, or not ours), checked before anything is printed; else None."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port"
    return None


def integrity_errors() -> tuple[type[Exception], ...]:
    return _imported((("fedmeta.export", "ExportError"), ("fedmeta.manifest", "ManifestError")))


def _other_user_errors() -> tuple[type[Exception], ...]:
    """Errors of other layers that only a user's input causes."""
    return _imported((("serving.auth", "KeyManagementError"), ("fedmeta.fl.certs", "CertificateError")))


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_BRACKETED = re.compile(r"\[[^\]]*\]|\{[^}]*\}")
_NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?|(?<![\w.])\d{4,}")


def redacted(message: str) -> str:
    """The first line of an unexpected error's message with values blanked: it may quote a data row.

    >>> redacted("could not convert string to float: 'ABC-123' at [0.25, 1e30]")
    "could not convert string to float: '…' at […]"
    """
    first = (message.strip().splitlines() or [""])[0]
    first = _QUOTED.sub("'…'", first)
    first = _BRACKETED.sub("[…]", first)
    first = _NUMBER.sub("…", first)
    return first[:160]


def report(error: BaseException) -> int:
    """Print one line for ``error``; returns the exit code."""
    if isinstance(error, user_errors() + _other_user_errors()):
        fail(error)
        return 2
    if isinstance(error, integrity_errors()):
        fail(error)
        return 1
    if isinstance(error, OSError) and error.filename is not None:
        fail(f"{error.filename}: {error.strerror or type(error).__name__}")
        return 2
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(error, file=sys.stderr)  # Python's own format: no local variables
    line = f"internal error: {type(error).__name__}: {redacted(str(error))}"
    hint = "" if os.environ.get(DEBUG_ENV) else f" (rerun with {DEBUG_ENV}=1 for a traceback)"
    console.print(f"[red]{escape(line)}[/]{escape(hint)}", soft_wrap=True)
    return 1


class FedmetaGroup(TyperGroup):
    """The root command group: runs every command inside the error boundary."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - the boundary: nothing escapes to a traceback with locals
            raise click.exceptions.Exit(report(e)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, windows_expand_args=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
            code = result if isinstance(result, int) else 0
        except click.exceptions.NoArgsIsHelpError as e:
            from typer import rich_utils

            rich_utils.rich_format_error(e)  # the help text, as typer prints it
            code = e.exit_code
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            fail(f"{e.format_message()}{where}")
            code = e.exit_code
        except click.ClickException as e:
            fail(e.format_message())
            code = e.exit_code
        except click.exceptions.Abort:
            fail("aborted")
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code
