"""``python -m serving``: serve a site home's promoted model with the connection guard (see :mod:`serving.server`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmeta.manifest import ManifestError
from fedmeta.registry import RegistryError, default_site_home
from serving.app import configure_logging, create_app
from serving.policy import PolicyError
from serving.server import run
from serving.settings import ServingSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--site-home", type=Path, default=None, help="the site's home folder (default: $FEDMETA_SITE_HOME or ./site-home)")
    parser.add_argument("--site", default=None, help="the site to serve (default: the only one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--access-log", action="store_true", help="one JSON line per request")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any ServingSettings field, e.g. --set shutdown_grace=10")
    args = parser.parse_args(argv)
    configure_logging(args.access_log)
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        settings = ServingSettings(site_home=args.site_home or default_site_home(), site=args.site, **overrides)
        app = create_app(settings)
    except (RegistryError, PolicyError, ValueError) as e:
        print(json.dumps({"event": "not_started", "error": str(e)}), file=sys.stderr)
        return 2
    except ManifestError as e:
        print(json.dumps({"event": "not_started", "error": f"refusing to start: {e}"}), file=sys.stderr)
        return 1
    run(app, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
