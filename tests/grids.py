"""Flower ``Grid`` stand-ins for round loops run in this process: the sites reply at once, or after a scripted number of pulls."""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


class ImmediateGrid:
    """A ``Grid`` over ``nodes`` (node id -> site name) whose sites reply when a message is pushed: :meth:`reply` says how.

    A reply is pulled :meth:`delay` pulls later (0 by default: at the next pull); replies that are ready come back in
    the order their messages were pushed.
    """

    def __init__(self, nodes: dict[int, str]):
        self.nodes = nodes
        self.pushed = 0
        self.tick = 0  # pulls so far
        self.pending: list[tuple[int, int, str, Message]] = []  # (ready at tick, order pushed, message id, reply)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            mid = f"m{self.pushed}"
            message.metadata.__dict__["_message_id"] = mid  # what Grid.push_messages does
            self.pending.append((self.tick + self.delay(message), self.pushed, mid, self.reply(message)))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        self.tick += 1
        wanted = set(ids)
        ready = sorted(p for p in self.pending if p[2] in wanted and p[0] <= self.tick)
        self.pending = [p for p in self.pending if p not in ready]
        return [reply for *_, reply in ready]

    def reply(self, message: Message) -> Message:
        raise NotImplementedError

    def delay(self, message: Message) -> int:
        return 0


def act_as_a_flower_task(monkeypatch) -> None:
    """Flower builds a Message only inside a task: be the ServerApp's."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
