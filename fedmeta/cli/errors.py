"""The errors a user can cause, and how a command reports them."""

from __future__ import annotations

import typer

from fedmeta.cli.output import console


def fail(error: Exception, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/] {error}")
    return typer.Exit(code)


def user_errors() -> tuple[type[Exception], ...]:
    from fedmeta.data import SchemaError
    from fedmeta.fl.config import ConfigError
    from fedmeta.personalize import PersonalizationError
    from fedmeta.registry import RegistryError
    from fedmeta.trained import ModelMismatchError

    return (SchemaError, ConfigError, PersonalizationError, RegistryError, ModelMismatchError)


def integrity_errors() -> tuple[type[Exception], ...]:
    from fedmeta.export import ExportError
    from fedmeta.manifest import ManifestError

    return (ExportError, ManifestError)
