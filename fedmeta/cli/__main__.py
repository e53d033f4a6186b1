"""``python -m fedmeta.cli``: the same as the ``fedmeta`` console script."""

from fedmeta.cli import app

if __name__ == "__main__":
    app()
