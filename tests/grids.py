"""Flower ``Grid`` stand-ins for round loops run in this process: the sites answer every message at once."""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


class ImmediateGrid:
    """A ``Grid`` over ``nodes`` (node id -> site name) whose sites reply as soon as a message is pushed: :meth:`reply` says how."""

    def __init__(self, nodes: dict[int, str]):
        self.nodes = nodes
        self.pushed = 0
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            mid = f"m{self.pushed}"
            message.metadata.__dict__["_message_id"] = mid  # what Grid.push_messages does
            self.pending[mid] = self.reply(message)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.pending.pop(mid) for mid in list(ids) if mid in self.pending]

    def reply(self, message: Message) -> Message:
        raise NotImplementedError


def act_as_a_flower_task(monkeypatch) -> None:
    """Flower builds a Message only inside a task: be the ServerApp's."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
