"""The site's head-job queue: one job runs at a time, ``head_queue_limit`` may wait, each in its own process.

A second request for a task that is already queued or running gets 409; a
full queue gets 429. A job is visible only to the key that asked for it and
to admin keys (:meth:`HeadJobs.visible`): to any other key it is answered
exactly as an unknown id is, so job ids cannot be probed, and a 409 names
the blocking job only to those who may read it. Every request is written to the audit log. A job runs
:mod:`serving.head_worker` in a spawned process, so cancelling it is
terminating that process; :meth:`HeadJobs.shutdown` does that when the
server stops and says so in the job's status, the log and the audit log.
When a job's version is promoted (by an admin's request, or a department's
where the site policy allows it), the store follows the registry.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from serving.auth import RANK, ApiKey
from serving.errors import ApiError
from serving.store import LoadedModel, ModelStore

log = logging.getLogger("fedmeta.serving")
CANCELLED_AT_SHUTDOWN = "cancelled: the server shut down while the job was {state}; nothing was registered; submit the request again"
POLL_SECONDS = 0.2


@dataclass
class HeadJob:
    id: str
    task: str
    requested_by: str
    owner: str  # the id of the key that asked for it (names need not be unique)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    version: str | None = None
    promoted: bool = False
    metrics: dict = field(default_factory=dict)
    note: str | None = None
    error: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "owner"}

    def visible_to(self, key: ApiKey) -> bool:
        return key.id == self.owner or RANK[key.role] >= RANK["admin"]


class HeadJobs:
    """A bounded queue of head jobs and the one thread that runs them, each in a process of its own."""

    def __init__(self, store: ModelStore, queue_limit: int):
        self.store, self.queue_limit = store, queue_limit
        self.jobs: dict[str, HeadJob] = {}
        self._pending: deque[tuple[HeadJob, dict]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._process = None
        self._worker = threading.Thread(target=self._loop, name="head-jobs", daemon=True)
        self._worker.start()

    def submit(self, request, plan: dict, key: ApiKey, model: LoadedModel) -> HeadJob:
        """Queue a checked request (blocking: writes the audit log; call it from a thread)."""
        with self._lock:
            if self._stopping.is_set():
                raise ApiError(503, "the server is shutting down; submit the request again when it is back", {"Retry-After": "30"})
            active = [j for j in self.jobs.values() if j.status in ("queued", "running")]
            same = [j for j in active if j.task == request.task]
            if same:
                which = f" (job {same[0].id})" if same[0].visible_to(key) else ""
                raise ApiError(409, f"a head job for task {request.task!r} is already {same[0].status}{which}; wait for it")
            if len(active) > self.queue_limit:
                raise ApiError(429, f"{len(active)} head jobs are queued or running (limit: 1 running + {self.queue_limit} waiting); retry later", {"Retry-After": "30"})
            job = HeadJob(id=uuid.uuid4().hex[:12], task=request.task, requested_by=key.name, owner=key.id)
            self.jobs[job.id] = job
        try:
            self.store.home.registry.record(
                f"key:{key.name}", "head_request", self.store.site, model.version.version,
                {"job": job.id, "task": request.task, "kind": request.kind, "rows": len(request.rows), "promote": request.promote},
            )
        except Exception:
            with self._lock:
                del self.jobs[job.id]
            raise
        spec = {
            "id": job.id, "site_home": str(self.store.home.path), "site": self.store.site, "parent": model.version.version,
            "request": request.model_dump(mode="json"), "plan": plan, "promote": request.promote, "actor": f"key:{key.name}",
            "personalized": [t.name for t in model.manifest.tasks if t.personalized and t.name != request.task],
        }
        with self._wake:
            self._pending.append((job, spec))
            self._wake.notify()
        return job

    def get(self, job_id: str) -> HeadJob:
        """Any job, for the server itself; a request goes through :meth:`visible`."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise ApiError(404, f"no head job {shown_id(job_id)}") from None

    def visible(self, job_id: str, key: ApiKey) -> HeadJob:
        """The job if ``key`` asked for it or is an admin's; otherwise the same 404 as an unknown id."""
        job = self.jobs.get(job_id)
        if job is None or not job.visible_to(key):
            raise ApiError(404, f"no head job {shown_id(job_id)}")
        return job

    # --- the worker thread ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping.is_set():
                    self._wake.wait()
                if self._stopping.is_set():
                    return
                job, spec = self._pending.popleft()
            self._run(job, spec)

    def _run(self, job: HeadJob, spec: dict) -> None:
        from serving import head_worker

        job.status = "running"
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=head_worker.run, args=(sender, spec), name=f"head-job-{job.id}", daemon=True)
        self._process = process
        process.start()
        sender.close()
        result = None
        try:
            while result is None and not self._stopping.is_set():
                if receiver.poll(POLL_SECONDS):
                    try:
                        result = receiver.recv()
                    except EOFError:  # the process died without a word
                        break
                elif not process.is_alive():
                    break
        finally:
            receiver.close()
        if result is None and self._stopping.is_set():
            self._cancel(job, process, "running")
            return
        process.join(timeout=10)
        if result is None:
            result = {"status": "failed", "error": f"the head job process ended unexpectedly (exit code {process.exitcode})"}
        if result.get("status") == "succeeded":
            job.version, job.promoted, job.metrics, job.note = result["version"], result["promoted"], result["metrics"], result["note"]
            if job.promoted:
                try:
                    self.store.sync()
                except Exception as e:  # the reload loop retries; the registry already names the version
                    log.error(json.dumps({"event": "sync_failed", "job": job.id, "error_type": type(e).__name__}))
        job.error = result.get("error")
        job.status = result["status"]
        job.finished_at = time.time()
        log.info(json.dumps({"event": "head_job", "job": job.id, "task": job.task, "status": job.status, "version": job.version, **result.get("log", {})}))

    def _cancel(self, job: HeadJob, process, state: str) -> None:
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        job.status, job.error, job.finished_at = "cancelled", CANCELLED_AT_SHUTDOWN.format(state=state), time.time()
        log.warning(json.dumps({"event": "head_job_cancelled", "job": job.id, "task": job.task, "was": state, "reason": "server shutdown"}))
        try:
            self.store.home.registry.record(f"key:{job.requested_by}", "head_cancelled", self.store.site, None, {"job": job.id, "task": job.task, "was": state})
        except Exception as e:
            log.error(json.dumps({"event": "audit_failed", "job": job.id, "error_type": type(e).__name__}))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel the running job (terminating its process) and the queued ones; returns within ``timeout`` + 10 s."""
        with self._wake:
            self._stopping.set()
            pending, self._pending = list(self._pending), deque()
            self._wake.notify_all()
        for job, _ in pending:
            self._cancel(job, None, "queued")
        self._worker.join(timeout=timeout)


def shown_id(job_id: str) -> str:
    return repr(job_id if len(job_id) <= 40 else job_id[:37] + "...")
