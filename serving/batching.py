"""Sharing onnxruntime calls: the requests that reach a model in the same event-loop turn make one call.

A call costs about the same for one row as for eight, so under concurrent load
most of a one-row prediction's model cost is saved; each request still gets
its own rows' outputs, bit for bit, and its own flags and errors (tested in
``tests/test_serving_batching.py``).
"""

from __future__ import annotations

import asyncio
import math

import numpy as np

from fedmeta.training_range import RangeCheck
from serving.store import Columns, check_finite


class RunBatcher:
    """One onnxruntime call for the requests that reach it in the same event-loop turn, each given its own rows' outputs.

    A call costs ~35 us whatever its rows (8 rows: ~40 us), so under concurrent load this
    is most of a one-row prediction's cost saved. No request waits for another: the batch
    runs on the next turn of the loop, after the requests already runnable have queued.
    Rows never mix in the exported graphs (per-row layers only), so each request's outputs
    are the ones it would get alone, bit for bit (tested).

    :meth:`predict` also checks the outputs' finiteness and the inputs' training range once
    for the whole batch; only when that finds something is each request checked on its own,
    so every request still gets its own flags and errors (tested).
    """

    def __init__(self, run, ranges: RangeCheck | None = None):
        self._run = run
        self._ranges = ranges
        self._pending: list[tuple[tuple[str, ...], dict, int, asyncio.Future, str | None]] = []

    async def run(self, tasks: list[str], feed: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        """The outputs of ``tasks`` for the ``n`` rows of ``feed``, as :meth:`LoadedModel.run` gives them."""
        return await self._queue(tasks, feed, n, None)

    async def predict(self, tasks: list[str], feed: dict[str, np.ndarray], n: int, where: str) -> tuple[list[np.ndarray], list[dict] | None]:
        """The outputs and the rows outside the training range (None: unrecorded); :func:`check_finite`'s 422 naming ``where``'s row."""
        return await self._queue(tasks, feed, n, where)

    def _queue(self, tasks: list[str], feed: dict[str, np.ndarray], n: int, where: str | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((tuple(tasks), feed, n, future, where))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[tuple[str, ...], list] = {}
        for item in pending:
            groups.setdefault(item[0], []).append(item)
        for tasks, items in groups.items():
            try:
                if len(items) == 1:
                    feed, total = items[0][1], items[0][2]
                    outputs = self._run(list(tasks), feed)
                    results = [outputs]
                else:
                    feed = Columns.joined([item[1] for item in items])
                    total = sum(item[2] for item in items)
                    outputs = self._run(list(tasks), feed)
                    results, start = [], 0
                    for _, _, n, _, _ in items:
                        results.append([out[start:start + n] for out in outputs])
                        start += n
            except Exception as e:  # a server fault: every request of the batch answers it (500)
                results = [e] * len(items)
            else:
                if any(item[4] is not None for item in items):
                    results = self._checked(list(tasks), items, results, feed, total, outputs)
            for item, result in zip(items, results):
                future = item[3]
                if future.done():  # cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _checked(self, tasks: list[str], items: list, results: list, feed: dict, total: int, outputs: list[np.ndarray]) -> list:
        """Each :meth:`predict` request's ``(outputs, outside)`` or its error, from one pass over the batch when it is clean."""
        finite = all(math.isfinite(out.sum()) for out in outputs)  # an overflowing sum only sends the requests on to their exact check
        inside = self._ranges is None or self._ranges.all_inside(feed, total)
        checked = []
        for (_, own_feed, n, _, where), result in zip(items, results):
            if where is None:
                checked.append(result)
                continue
            try:
                if not finite:
                    check_finite(tasks, result, where, n)
                outside = None if self._ranges is None else [] if inside else self._ranges.flagged(own_feed, n)
                checked.append((result, outside))
            except Exception as e:  # this request's 422 (or fault) only
                checked.append(e)
        return checked
