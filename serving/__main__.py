"""``python -m serving``: ``fedmeta serve`` by another name, with the same options and the same implementation."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from fedmeta.cli import app

    args = sys.argv[1:] if argv is None else argv
    return app(["serve", *args], prog_name="fedmeta", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
