"""A site's prediction server: FastAPI + ONNX Runtime over the site's model registry.

``create_app(settings)`` builds the app (routers in ``predict``, ``v2``,
``models``, ``heads``); ``auth`` holds API keys, ``store`` the served model,
``metrics`` the Prometheus counters. This package depends on exported
artifacts and the registry, never on Flower.
"""

from serving.app import app_from_env, create_app
from serving.settings import ServingSettings

__all__ = ["ServingSettings", "app_from_env", "create_app"]
