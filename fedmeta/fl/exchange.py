"""Messages on the wire: waiting (bounded) for sites to connect, and push/pull exchanges with a deadline.

Flower's own ``Grid.send_and_receive`` sleeps 3 s between pulls on the
Deployment Engine, and its node sampling waits forever; these two functions
bound every wait and poll every 0.1 s. The strategy and the round loop reach
them through this module (``wire.exchange``), so one place sees every reply
a site sends (the data-leak test records them here).
"""

from __future__ import annotations

import logging
import threading
import time

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("flwr.fedmeta")

#: Set to stop a run at the next safe point (Ctrl-C): between rounds, or while waiting for replies.
STOP = threading.Event()


class StopRequested(RuntimeError):
    """The operator asked the run to stop (:data:`STOP`); the last completed round is checkpointed."""


class TooFewSitesError(RuntimeError):
    """Fewer sites connected than the run needs, after waiting ``sampling_timeout``."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 0.5, wanted: int | None = None) -> list[int]:
    """Connected node ids once ``wanted`` (default ``minimum``) are there; at the deadline, settle for ``minimum``.

    Raises :class:`TooFewSitesError` if fewer than ``minimum`` connected within
    ``timeout`` seconds. Flower's own sampling waits forever, and the strategy
    timeout does not cover it.
    """
    wanted = max(minimum, wanted or minimum)
    deadline = time.monotonic() + timeout
    while True:
        if STOP.is_set():
            raise StopRequested("stop requested while waiting for sites to connect")
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= minimum:
                log.warning("%d of the federation's %d site(s) connected within %.0f s; going on with them", len(nodes), wanted, timeout)
                return nodes
            raise TooFewSitesError(
                f"only {len(nodes)} site(s) connected after waiting {timeout:.0f} s; the run needs at least {minimum} "
                "(server.min_sites). Start more SuperNodes or lower server.min_sites."
            )
        time.sleep(poll)


#: The node each message of the last exchange went to, by message id (see :func:`node_of`).
_destinations: dict[str, int] = {}


def node_of(reply: Message) -> int:
    """The node a reply answers for: the one its message was sent to.

    Not ``reply.metadata.src_node_id``: when a node is unavailable, the
    SuperLink writes the error reply itself, under its own node id.
    """
    return _destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def exchange(grid: Grid, groups: dict[str, list[Message]], timeout: float, poll: float = 0.1) -> dict[str, list[Message]]:
    """Push every group of messages at once and collect replies, per group, until all arrive or ``timeout`` passes.

    ``Grid.send_and_receive`` sleeps 3 s between pulls on the Deployment Engine;
    polling every ``poll`` seconds instead cuts that wait from each round.
    """
    group_of = {}
    _destinations.clear()  # replies are read before the next exchange starts
    for name, messages in groups.items():
        if messages:
            for mid, message in zip(grid.push_messages(messages), messages):
                group_of[mid] = name
                _destinations[mid] = message.metadata.dst_node_id
    pending = set(group_of)
    replies: dict[str, list[Message]] = {name: [] for name in groups}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(pending):
            mid = reply.metadata.reply_to_message_id
            replies[group_of[mid]].append(reply)
            pending.discard(mid)
        if not pending:
            break
        if STOP.is_set():
            raise StopRequested(f"stop requested while {len(pending)} site(s) were still working")
        if time.monotonic() >= deadline:
            log.warning("%d site(s) did not reply within %.0f s (server.round_timeout)", len(pending), timeout)
            break
        time.sleep(poll)
    return replies


def push(grid: Grid, messages: list[Message]) -> list[str]:
    """Send ``messages`` without waiting (asynchronous rounds); returns their ids, in order, for :func:`pull`."""
    ids = list(grid.push_messages(messages)) if messages else []
    for mid, message in zip(ids, messages):
        _destinations[mid] = message.metadata.dst_node_id
    return ids


def pull(grid: Grid, ids: set[str]) -> list[Message]:
    """The replies to any of ``ids`` that have arrived (none is waited for)."""
    return list(grid.pull_messages(ids)) if ids else []


def short_reason(reason: str) -> str:
    """A site's failure in one line: the site's own message, without the pages of traceback Flower wraps it in."""
    reason = reason.rsplit("Message:", 1)[-1].strip().removesuffix("'>").strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else "no reason given"
