"""A site's prediction server: FastAPI + ONNX Runtime over the site's model registry.

``create_app(settings)`` builds the app (routers in ``predict``, ``v2``,
``models``, ``heads``); ``auth`` holds API keys, ``store`` the served model
(it follows the registry), ``bodies`` reads bounded JSON, ``head_jobs`` and
``head_worker`` run head training in a process of its own, ``policy`` is
the site's serving policy, ``metrics`` the Prometheus series, ``openapi``
the document. ``server`` runs it under uvicorn with the connection guard of
``protocol`` (``python -m serving``). This package depends on exported
artifacts and the registry, never on Flower.
"""

from serving.app import app_from_env, create_app
from serving.settings import ServingSettings

__all__ = ["ServingSettings", "app_from_env", "create_app"]
