"""Concurrent one-row predictions share one onnxruntime call, and each request still gets exactly its own answer (issue 25, throughput)."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from fedmeta.registry import SiteHome
from serving import create_app
from serving.auth import KeyStore
from serving.batching import RunBatcher
from serving.store import Columns
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


def test_a_batch_flags_each_requests_own_rows_outside_the_training_range(served):
    app, _ = served
    model = app.state.fedmeta.store.current
    calls = []

    def counted(tasks, feed):
        calls.append(len(next(iter(feed.values()))))
        return model.run(tasks, feed)

    age_max = float(model.ranges.hi[model.ranges.names.index("age"), 0])
    far = {**ROWS[1], "age": age_max + 50}
    requests = [[ROWS[0]], [far], [ROWS[2]], [ROWS[3], far], [ROWS[4]]]
    feeds = [model.validator.columns(rows, "rows")[0] for rows in requests]
    batcher = RunBatcher(counted, model.ranges)

    async def together():
        return await asyncio.gather(*(batcher.predict(model.tasks, feed, len(rows), "rows") for feed, rows in zip(feeds, requests)))

    results = asyncio.run(together())
    assert calls == [6]
    assert [outside for _, outside in results] == [[], [{"row": 0, "features": ["age"]}], [], [{"row": 1, "features": ["age"]}], []]
    for (outputs, outside), feed, rows in zip(results, feeds, requests):
        assert outside == model.outside_training_range(feed, len(rows))  # what the request would get alone
        assert all(np.array_equal(a, b) for a, b in zip(outputs, model.run(model.tasks, feed)))


def test_a_batch_refuses_only_the_request_whose_own_row_has_an_output_that_is_not_finite(served):
    app, _ = served
    model = app.state.fedmeta.store.current

    def nan_in_fourth_row(tasks, feed):
        outputs = model.run(tasks, feed)
        outputs[0][3] = np.nan  # the batch's fourth row: the second row of the third request
        return outputs

    requests = [[ROWS[0]], [ROWS[1]], [ROWS[2], ROWS[3]], [ROWS[4]]]
    feeds = [model.validator.columns(rows, "rows")[0] for rows in requests]
    batcher = RunBatcher(nan_in_fourth_row, model.ranges)

    async def together():
        return await asyncio.gather(*(batcher.predict(model.tasks, feed, len(rows), "rows") for feed, rows in zip(feeds, requests)),
                                    return_exceptions=True)

    results = asyncio.run(together())
    assert [type(r).__name__ for r in results] == ["tuple", "tuple", "ApiError", "tuple"]
    assert results[2].message.startswith(f"rows[1]: the model's {model.tasks[0]!r} output is not a finite number"), results[2].message
    assert all(outside == [] for _, outside in (results[0], results[1], results[3]))


def test_a_batch_joins_its_requests_feeds_into_the_columns_each_input_would_get_by_itself(served):
    """Feeds of one validator join by two matrix concatenations; any other feed by one per input: the same columns either way."""
    app, _ = served
    model = app.state.fedmeta.store.current
    feeds = [model.validator.columns(rows, "rows")[0] for rows in ([ROWS[0]], ROWS[1:4], [ROWS[6]])]  # wards: one differs at each end
    joined = Columns.joined(feeds)
    expected = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
    assert type(joined) is Columns and list(joined) == list(expected) == model.validator.numeric + list(model.validator.categorical)
    for name, column in expected.items():
        assert joined[name].dtype == column.dtype and joined[name].flags.c_contiguous and joined[name].tolist() == column.tolist(), name
    mixed = Columns.joined([feeds[0], dict(feeds[1]), feeds[2]])  # a plain dict (e.g. built by hand) among them
    assert type(mixed) is dict and all(mixed[name].tolist() == column.tolist() for name, column in expected.items())
