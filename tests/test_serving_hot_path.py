"""The 1-row predict path's shortcuts (issue 25, throughput) keep what they replaced: the key, the counts, the body, the route."""

import asyncio
import json

import pytest

from fedmeta.registry import SiteHome
from serving import create_app
from serving.auth import KeyStore
from serving.errors import ApiError
from serving.metrics import Metrics
from site_server import ROW, publish_version, settings


def raw(**headers: str) -> list[tuple[bytes, bytes]]:
    """ASGI's form of request headers: lower-case names, bytes."""
    return [(name.replace("_", "-").lower().encode(), value.encode("latin-1")) for name, value in headers.items()]


@pytest.fixture(scope="module")
def app(tmp_path_factory, hospitals, base_run):
    home = SiteHome(tmp_path_factory.mktemp("hot-path") / "home")
    publish_version(home, hospitals, base_run, seed=1, promote=True)
    app = create_app(settings(home, max_body_bytes=4096))
    app.state.predict_key = KeyStore(home.path).create("predict-app", "predict")[1]
    return app


def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict]:
    """One request through the whole ASGI app, its body sent as ``chunks`` (more than one: as a chunked upload would arrive)."""
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8080)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"null")


def test_x_api_key_is_read_before_the_authorization_header_and_bearer_in_any_case_with_spaces_around_the_token(tmp_path):
    store = KeyStore(tmp_path)
    _, predict = store.create("predict-app", "predict")
    _, admin = store.create("admin-app", "admin")
    assert store.authorize(raw(x_api_key=predict, authorization=f"Bearer {admin}"), "predict").role == "predict"
    assert store.authorize(raw(authorization=f"bEaReR   {admin} "), "admin").role == "admin"
    assert store.authorize(raw(authorization="Bearer fm_wrong", x_api_key=admin), "admin").role == "admin"
    for headers, message in [(raw(authorization=f"Basic {admin}"), "missing API key"), (raw(x_api_key=""), "missing API key"),
                             (raw(authorization=f"Bearer {admin}x"), "invalid or revoked")]:
        with pytest.raises(ApiError) as refused:
            store.authorize(headers, "predict")
        assert refused.value.status == 401 and message in refused.value.message


def test_predictions_are_counted_per_task_whatever_set_of_tasks_each_request_asked_for():
    metrics = Metrics(lambda: {"site": "s", "version": "v1", "sha256": "0" * 64})
    assert "fedmeta_predictions_total{" not in metrics.exposition().decode()
    metrics.observe("/v1/predict", "POST", 200, 0.001, (["mortality", "readmission_30d"], 3, []))
    metrics.observe("/v1/predict", "POST", 200, 0.001, (["readmission_30d"], 2, []))
    metrics.observe("/v1/predict", "POST", 200, 0.001, (["mortality", "readmission_30d"], 1, None))
    text = metrics.exposition().decode()
    assert 'fedmeta_predictions_total{task="mortality"} 4.0' in text
    assert 'fedmeta_predictions_total{task="readmission_30d"} 6.0' in text
    assert text.count("fedmeta_predictions_created{task=") == 2
    assert "# TYPE fedmeta_predictions_total counter" in text


def test_a_body_in_several_messages_is_read_whole_and_bounded_as_one(app):
    key = app.state.predict_key
    headers = raw(authorization=f"Bearer {key}", content_type="application/json")  # no Content-Length: chunked
    body = json.dumps({"row": ROW}).encode()
    status, answer = call(app, "POST", "/v1/predict", headers, [body[:10], body[10:40], body[40:]])
    assert status == 200 and answer["rows"] == 1
    status, answer = call(app, "POST", "/v1/predict", headers, [b" " * 2048, b" " * 2048, body])
    assert status == 413 and answer == {"error": "request body exceeds the limit of 4096 bytes"}


def test_the_predict_route_answers_its_errors_as_json_and_another_method_with_405(app):
    key = app.state.predict_key
    body = json.dumps({"row": {**ROW, "age": "old"}}).encode()
    headers = raw(authorization=f"Bearer {key}", content_type="application/json", content_length=str(len(body)))
    status, answer = call(app, "POST", "/v1/predict", headers, [body])
    assert status == 422 and answer["error"].startswith("row.age: expected a number")
    status, _ = call(app, "GET", "/v1/predict", raw(authorization=f"Bearer {key}"), [b""])
    assert status == 405
