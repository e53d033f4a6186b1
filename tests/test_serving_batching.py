"""Concurrent one-row predictions share one onnxruntime call, and each request still gets exactly its own answer (issue 25, throughput)."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from fedmeta.registry import SiteHome
from serving import create_app
from serving.auth import KeyStore
from serving.store import RunBatcher
from site_server import ROW, auth, publish_version, settings

ROWS = [{**ROW, "age": 30 + 7 * i, "wbc": 4.0 + i, "ward": ["medical", "surgical", "cardiology", "icu"][i % 4]} for i in range(8)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, hospitals, base_run):
    home = SiteHome(tmp_path_factory.mktemp("batching") / "home")
    publish_version(home, hospitals, base_run, seed=1, promote=True)
    return create_app(settings(home)), auth(KeyStore(home.path).create("predict-app", "predict")[1])


def test_requests_in_one_loop_turn_make_one_call_per_task_set_and_get_their_own_rows_bit_for_bit(served):
    app, _ = served
    model = app.state.fedmeta.store.current
    calls = []

    def counted(tasks, feed):
        calls.append(len(next(iter(feed.values()))))
        return model.run(tasks, feed)

    feeds = [model.validator.columns([row], "rows")[0] for row in ROWS]
    pair = model.validator.columns(ROWS[:2], "rows")[0]
    batcher = RunBatcher(counted)

    async def together():
        return await asyncio.gather(*(batcher.run(model.tasks, feed, 1) for feed in feeds), batcher.run(model.tasks, pair, 2),
                                    batcher.run(["mortality"], feeds[0], 1))

    results = asyncio.run(together())
    assert sorted(calls) == [1, 10]  # the mortality-only request alone; the other nine requests' ten rows in one call
    for feed, outputs in zip(feeds + [pair], results):
        alone = model.run(model.tasks, feed)
        assert all(np.array_equal(a, b) and a.shape == b.shape for a, b in zip(outputs, alone))
    assert np.array_equal(results[-1][0], model.run(["mortality"], feeds[0])[0])


def test_concurrent_predict_requests_answer_as_they_would_one_at_a_time(served):
    app, key = served

    async def ask(client, row):
        r = await client.post("/v1/predict", json={"row": row}, headers=key)
        assert r.status_code == 200, r.text
        return r.json()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            alone = [await ask(client, row) for row in ROWS]
            together = await asyncio.gather(*(ask(client, row) for row in ROWS))
        return alone, together

    alone, together = asyncio.run(run())
    assert len({json.dumps(a["predictions"], sort_keys=True) for a in alone}) == len(ROWS)  # control: the rows differ in their answers
    assert together == alone
