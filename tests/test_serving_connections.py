"""Hostile connections: slow and oversized requests, exhausted descriptors, disconnects, and shutdown.

Each attack runs against a real server on 127.0.0.1 while valid requests
are sent, and the valid requests are compared with the same requests sent
before the attack (the control): bounds derive from that baseline.
"""

import json
import logging
import signal
import socket
import statistics
import threading
import time

import httpx

from site_server import ROW, auth, running, serve_process, settings, site_home  # noqa: F401

HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _latencies(url: str, key: str, n: int, timeout: float) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(key), timeout=timeout)  # a new connection each time
        assert r.status_code == 200, r.text
        out.append(time.perf_counter() - start)
    return out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_half_sent_requests_cannot_exhaust_descriptors_and_valid_requests_keep_being_answered(site_home):
    """Item 5: 1,000 half-sent unauthenticated requests against a server allowed 256 descriptors."""
    home, keys = site_home
    with serve_process(home, nofile=256) as (url, _):
        control = _latencies(url, keys["predict"], 10, timeout=30)
        bound = max(5.0, 100 * max(control))
        attackers = []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", _port(url)), timeout=30)
                s.sendall(HEAD)  # and never the rest
                attackers.append(s)
            during = _latencies(url, keys["predict"], 10, timeout=bound)
        finally:
            for s in attackers:
                s.close()
    assert len(during) == 10


def test_a_request_head_that_never_ends_is_answered_408_after_the_header_timeout(site_home):
    home, keys = site_home
    with running(settings(home, header_timeout=1.0)) as (url, _):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
            s.sendall(HEAD)
            start = time.monotonic()
            answer = _recv_all(s)
            waited = time.monotonic() - start
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).status_code == 200
    assert answer.startswith(b"HTTP/1.1 408") and b"request head not received within 1 s" in answer
    assert waited < 30  # closed by the server, not by this test's socket timeout


def test_a_body_that_never_arrives_is_dropped_and_counted_408(site_home):
    home, keys = site_home
    with running(settings(home, body_timeout=1.0)) as (url, _):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
            s.sendall(HEAD + f"Authorization: Bearer {keys['predict']}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"row": ')
            start = time.monotonic()
            _recv_all(s)
            waited = time.monotonic() - start
        metrics = httpx.get(f"{url}/metrics", headers=auth(keys["predict"])).text
    assert waited < 30
    assert 'fedmeta_requests_total{method="POST",route="/v1/predict",status="408"} 1.0' in metrics


def test_an_oversized_request_head_is_refused_431_without_reading_it(site_home):
    """Item 5: a 120 MB header took 32 s and stalled every route; now the server stops reading at the limit."""
    home, keys = site_home
    with running(settings(home)) as (url, _):
        control = _latencies(url, keys["predict"], 10, timeout=30)
        sent, answer = 0, b""
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
            s.sendall(HEAD + b"X-Pad: ")
            chunk = b"a" * 65536
            try:
                while sent < 64 * 1024 * 1024:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = _recv_all(s)
        after = _latencies(url, keys["predict"], 10, timeout=max(5.0, 100 * max(control)))
    assert sent < 8 * 1024 * 1024, f"the server read {sent} bytes of one header"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    assert len(after) == 10


def test_a_deeply_nested_body_is_refused_before_parsing_and_other_requests_are_not_held(site_home):
    """Item 5: a 4 MiB nested body held the event loop for 4-11 s."""
    home, keys = site_home
    unit = "[" * 1000 + "]" * 1000
    nested = ('{"rows": [' + ",".join([unit] * 2000) + "]}").encode()
    h = {**auth(keys["predict"]), "Content-Type": "application/json"}
    with running(settings(home)) as (url, _):
        control = _latencies(url, keys["predict"], 20, timeout=30)
        stop, refused = threading.Event(), []

        def attacker():
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    r = http.post(f"{url}/v1/predict", content=nested, headers=h)
                    refused.append((r.status_code, r.json()["error"]))

        thread = threading.Thread(target=attacker)
        thread.start()
        try:
            time.sleep(0.2)
            during = _latencies(url, keys["predict"], 20, timeout=60)
        finally:
            stop.set()
            thread.join(timeout=60)
    assert refused and all(status == 413 and "JSON arrays and objects exceed the limit" in error for status, error in refused)
    assert statistics.median(during) < 20 * statistics.median(control) + 0.05, (statistics.median(during), statistics.median(control))


def test_a_client_disconnect_is_its_own_status_with_one_log_line_and_no_traceback(site_home, caplog, capfd):
    """Item 8: a disconnect was logged as a 500 with two tracebacks and counted as 500."""
    home, keys = site_home
    with caplog.at_level(logging.INFO):
        with running(settings(home)) as (url, _):
            with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
                s.sendall(HEAD + f"Authorization: Bearer {keys['predict']}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"row": ')
                time.sleep(0.3)
            time.sleep(0.3)
            metrics = httpx.get(f"{url}/metrics", headers=auth(keys["predict"])).text
    assert 'fedmeta_requests_total{method="POST",route="/v1/predict",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics
    lines = [r.getMessage() for r in caplog.records if "client_disconnected" in r.getMessage()]
    assert len(lines) == 1 and json.loads(lines[0])["status"] == 499
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_sigterm_answers_every_request_already_sent_and_tells_clients_to_stop_reusing_connections(site_home):
    """Item 7: requests sent but not yet read were reset at SIGTERM."""
    home, keys = site_home
    body = json.dumps({"row": ROW}).encode()
    request = HEAD + f"Authorization: Bearer {keys['predict']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    answered, dropped, told_to_close = [0], [], [0]

    def client(port: int, started: threading.Event):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        buffer = b""
        try:
            while True:
                try:
                    s.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    dropped.append("send failed on a connection the server had not closed for us")
                    return
                head = b""
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        dropped.append("request sent, connection closed without an answer")
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                while len(buffer) < length:
                    buffer += s.recv(65536)
                buffer = buffer[length:]
                answered[0] += 1
                started.set()
                if b"connection: close" in head.lower():
                    told_to_close[0] += 1
                    return
        finally:
            s.close()

    with serve_process(home, "shutdown_grace=10") as (url, process):
        started = [threading.Event() for _ in range(16)]
        threads = [threading.Thread(target=client, args=(_port(url), e)) for e in started]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(60)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        process.wait(timeout=90)
    assert dropped == []
    assert told_to_close[0] == 16 and answered[0] > 16
