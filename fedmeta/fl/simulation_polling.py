"""How Flower's simulation runtime finds the messages waiting for its sites, in time that does not grow with the population,
and how many of them it serves at once.

Flower 1.41's runtime (``flwr.server.superlink.fleet.vce.vce_api``) hands
messages to its workers from a thread that, every 0.1 s, asks the in-memory
LinkState for each registered node in turn whether a message waits for it;
each of those questions scans every stored message and re-checks its TTL.
A sweep therefore costs (nodes x stored messages): at 10,000 sites and a
sample of 20, about a second per sweep, spent holding the GIL and the state's
lock, so a 20-site round took 1.3 s instead of 0.34 s at 100 sites, and the
10,000-message roll call took 277 s (measured with ``benchmarks/scale.py``).

:func:`pending_messages` does one sweep in one pass over the stored messages:
the same TTL and federation checks (Flower's own ``_check_stored_messages``),
the same one message per node per sweep, the same "delivered" mark.
:func:`install` puts it in place of Flower's loop for simulations started in
this process; on a LinkState without the in-memory store it looks into
(another Flower version), Flower's own loop is kept.

The runtime then starts one worker per Ray actor (``cpus / cpus_per_site``)
in ``ThreadPoolExecutor()``, whose default size is the machine's cores + 4:
on 2 cores at most 6 sites were served at once, whatever ``cpus_per_site``
promised, so 20 sites that each wait 1 s took 5.3 s a round instead of 2
(measured for issue 27; with no waits, 1.0 s). :func:`install` also gives
that pool one thread per worker (:class:`EveryWorker`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.date import now

_flower_loop = vce_api.add_messages_to_queue


def _in_memory(state) -> bool:
    return all(hasattr(state, name) for name in ("lock", "message_ins_store", "_check_stored_messages"))


def pending_messages(state, nodes: dict[int, int]) -> list[Message]:
    """The undelivered messages for ``nodes``, at most one per node (the oldest), now marked delivered."""
    with state.lock:
        waiting = [mid for mid, m in state.message_ins_store.items() if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes]
        if not waiting:
            return []
        state._check_stored_messages(set(waiting))  # expired messages are dropped here, as Flower's own scan drops them
        found: dict[int, Message] = {}
        for mid in waiting:
            message = state.message_ins_store.get(mid)
            if message is not None and message.metadata.dst_node_id not in found:
                found[message.metadata.dst_node_id] = message
        delivered_at = now().isoformat()
        for message in found.values():
            message.metadata.delivered_at = delivered_at
    return list(found.values())


def add_messages_to_queue(state, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's message loop (same signature, same 0.1 s period), one pass over the stored messages per sweep."""
    if not _in_memory(state):
        return _flower_loop(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        for message in pending_messages(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)


class EveryWorker(ThreadPoolExecutor):
    """A pool that runs every submitted worker at once: each of Flower's workers loops until the run stops, so a
    worker beyond the pool's size never starts, and its actor sits idle. Threads are still made only when submitted."""

    def __init__(self, max_workers: int | None = None, *args, **kwargs):
        super().__init__(max_workers or EVERY_WORKER_CAP, *args, **kwargs)


#: More actors than a simulation starts (one per ``cpus_per_site`` share of the cores); never reached in practice.
EVERY_WORKER_CAP = 4096


def install() -> None:
    """Use :func:`add_messages_to_queue` and :class:`EveryWorker` in simulations started from now on (``run_api``
    looks both up at each start)."""
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.ThreadPoolExecutor = EveryWorker
