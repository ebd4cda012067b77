"""A real `llmkit serve` under hostile and unlucky traffic: shutdown past the grace period, idle and half-sent
connections, too many connections, forged X-Forwarded-For, and JSON-only output with --log-format json.

Connections are raw sockets where the point is what a well-behaved HTTP client would never do.
"""

import concurrent.futures
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_helpers import ServerProcess, free_port, seed_without_eos, sse_events

STEP_DELAY = {"LLMKIT_TEST_STEP_DELAY": "0.05"}  # a token every 50 ms: 100 tokens take 5 s
IDLE_S, READ_S = 1.0, 2.0  # the connection tests' --idle-timeout and --read-timeout
RATE = 3  # --rate-limit N/minute, for the X-Forwarded-For tests
QUICK_S = 0.5  # /health must answer within this while connections misbehave


def json_records(text: str) -> list[dict]:
    """Each complete non-empty line parsed as JSON (raises on one that is not); a line still being written is left."""
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def health_is_quick(url: str) -> None:
    started = time.monotonic()
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < QUICK_S


# --- shutdown past --grace-period -----------------------------------------------------------------------------


STREAMS = 4


def test_shutdown_past_the_grace_period_ends_each_request_with_an_answer(tiny_model_dir, tmp_path, tiny_engine):
    """Each stream still running when --grace-period runs out ends with an error event and [DONE]; a request
    waiting for its whole answer gets a 503; nothing is cancelled mid-write, no traceback, exit 0."""
    body = {"prompt": "slow", "max_tokens": 100, "seed": seed_without_eos(tiny_engine, "slow", 100)}
    started = threading.Barrier(STREAMS + 1)

    def stream() -> list:
        with httpx.Client(base_url=process.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                events = sse_events(response)
                first = next(events)
                started.wait()
                return [first, *events]

    def whole() -> httpx.Response:
        with httpx.Client(base_url=process.url, timeout=30) as http:
            return http.post("/v1/completions", json=body)

    with ServerProcess(tiny_model_dir, tmp_path / "server.log", "--grace-period", "1", env=STEP_DELAY) as process:
        with concurrent.futures.ThreadPoolExecutor(STREAMS + 1) as pool:
            streams = [pool.submit(stream) for _ in range(STREAMS)]
            waiting = pool.submit(whole)
            started.wait(timeout=20)
            deadline = time.monotonic() + 10
            while httpx.get(process.url + "/health").json()["running"] < STREAMS + 1:
                assert time.monotonic() < deadline, "the non-streaming request never started"
                time.sleep(0.05)
            process.signal(signal.SIGTERM)
            signalled = time.monotonic()
            for future in streams:
                events = future.result(timeout=10)
                assert events[-1] == "[DONE]"
                assert events[-2]["error"]["type"] == "shutting_down", events[-2]
                assert all("choices" in event for event in events[:-2])  # tokens until then
            answer = waiting.result(timeout=10)
            ended = time.monotonic() - signalled
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "shutting_down"
        assert 0.8 < ended < 4  # they ran on for the grace period, and were answered right after it
        assert process.wait(timeout=10) == 0
    log = process.log()
    assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log, log


# --- idle, half-sent and too many connections -----------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def seconds_until_closed(sock: socket.socket, since: float) -> tuple[float, bytes]:
    """(seconds from `since` until the server closed `sock`, what it sent before)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - since, received


@pytest.fixture(scope="module")
def timeouts_server(tiny_model_dir, tmp_path_factory):
    """Short connection timeouts; also the default for X-Forwarded-For (trusted from nobody)."""
    with ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve-timeouts") / "server.log",
        "--idle-timeout",
        str(IDLE_S),
        "--read-timeout",
        str(READ_S),
        "--rate-limit",
        f"{RATE}/minute",
        "--log-format",
        "json",
    ) as process:
        yield process


def test_idle_connections_are_closed_after_the_idle_timeout(timeouts_server):
    opened = time.monotonic()
    fresh = [connect(timeouts_server.port) for _ in range(50)]  # never send a byte
    kept_alive = connect(timeouts_server.port)
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    health_is_quick(timeouts_server.url)
    with concurrent.futures.ThreadPoolExecutor(len(fresh) + 1) as pool:
        closed = list(pool.map(seconds_until_closed, [*fresh, kept_alive], [opened] * (len(fresh) + 1)))
    for seconds, received in closed[:-1]:
        assert IDLE_S - 0.1 < seconds < IDLE_S + 1.5 and received == b""
    seconds, received = closed[-1]
    assert received.startswith(b"HTTP/1.1 200") and seconds < IDLE_S + 1.5  # then idle between requests
    health_is_quick(timeouts_server.url)
    for sock in [*fresh, kept_alive]:
        sock.close()


HALF_SENT = {
    "request line": [b"GET /heal"],
    "headers": [b"GET /health HTTP/1.1\r\nHost: t\r\n"],
    "body": [
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": '
    ],
    "drip": [bytes([byte]) for byte in b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"],  # a byte every 0.4 s
}
DRIP_EVERY_S = 0.4  # under the idle timeout: only a timer from the request's first byte can stop it


def test_half_sent_requests_are_closed_after_the_read_timeout(timeouts_server):
    def send_then_wait(pieces: list[bytes]) -> tuple[float, bytes]:
        with connect(timeouts_server.port, source="127.0.0.6") as sock:  # its own rate limit bucket
            sock.sendall(pieces[0])
            first_byte = time.monotonic()
            for piece in pieces[1:]:
                if select.select([sock], [], [], DRIP_EVERY_S)[0]:  # closed by the server meanwhile
                    break
                sock.sendall(piece)
            return seconds_until_closed(sock, first_byte)

    with concurrent.futures.ThreadPoolExecutor(len(HALF_SENT)) as pool:
        results = dict(zip(HALF_SENT, pool.map(send_then_wait, HALF_SENT.values())))
        health_is_quick(timeouts_server.url)
    for name, (seconds, received) in results.items():
        assert READ_S - 0.3 < seconds < READ_S + 1.5, (name, seconds)  # longer than the idle timeout
        assert not received.startswith(b"HTTP/1.1 200"), name
    health_is_quick(timeouts_server.url)
    assert "Traceback" not in timeouts_server.log()


def test_connections_beyond_the_cap_are_refused_while_earlier_ones_work(tiny_model_dir, tmp_path):
    cap = 4
    with ServerProcess(
        tiny_model_dir, tmp_path / "server.log", "--max-connections", str(cap), "--idle-timeout", "30"
    ) as process:
        time.sleep(0.2)  # the start-up health checks' connections are gone
        held = [connect(process.port) for _ in range(cap)]
        seconds, refused = seconds_until_closed(connect(process.port), time.monotonic())
        assert refused.startswith(b"HTTP/1.1 503") and b"connection: close" in refused.lower() and seconds < 1
        assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "too_many_connections"
        for sock in held:  # each earlier connection is served
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        held.pop().close()
        deadline = time.monotonic() + 2
        while True:  # a slot is free once the server has seen the close
            try:
                health_is_quick(process.url)
                break
            except (AssertionError, httpx.TransportError):
                assert time.monotonic() < deadline, "a closed connection never freed its slot"
                time.sleep(0.05)
        for sock in held:
            sock.close()
        assert "refusing new connections" in process.log()


# --- X-Forwarded-For --------------------------------------------------------------------------------------------


def access_clients(server: ServerProcess, path: str, count: int) -> list[str]:
    """The client address of each access line for `path`, once there are `count` (a line follows its response)."""
    deadline = time.monotonic() + 5
    while True:
        clients = [
            r["client"] for r in json_records(server.log()) if r.get("logger") == "llmkit.access" and r["path"] == path
        ]
        if len(clients) >= count or time.monotonic() > deadline:
            return clients
        time.sleep(0.05)


def forged_requests(url: str, local_address: str, prefix: str) -> list[int]:
    """Statuses of RATE + 1 requests from `local_address`, each claiming another client in X-Forwarded-For."""
    transport = httpx.HTTPTransport(local_address=local_address)
    with httpx.Client(base_url=url, transport=transport, timeout=10) as client:
        return [
            client.get("/v1/models", headers={"x-forwarded-for": f"{prefix}.{i}"}).status_code for i in range(RATE + 1)
        ]


def test_x_forwarded_for_from_loopback_is_not_trusted_by_default(timeouts_server):
    statuses = forged_requests(timeouts_server.url, "127.0.0.1", "10.0.0")
    assert statuses == [200] * RATE + [429]  # a new forged address per request does not escape the limit
    assert access_clients(timeouts_server, "/v1/models", RATE + 1) == ["127.0.0.1"] * (RATE + 1)  # the real one


def test_x_forwarded_for_is_honoured_from_a_trusted_proxy_only(tiny_model_dir, tmp_path):
    with ServerProcess(
        tiny_model_dir,
        tmp_path / "server.log",
        "--rate-limit",
        f"{RATE}/minute",
        "--log-format",
        "json",
        "--forwarded-allow-ips",
        "127.0.0.2",
    ) as process:
        assert forged_requests(process.url, "127.0.0.2", "10.0.0") == [200] * (RATE + 1)  # a limit per client
        assert forged_requests(process.url, "127.0.0.1", "10.1.0") == [200] * RATE + [429]  # not in the list
        clients = access_clients(process, "/v1/models", 2 * (RATE + 1))
        assert clients == [f"10.0.0.{i}" for i in range(RATE + 1)] + ["127.0.0.1"] * (RATE + 1)


# --- --log-format json: every line is JSON ----------------------------------------------------------------------


def test_json_log_format_writes_only_json_lines(tiny_model_dir, tmp_path):
    with ServerProcess(tiny_model_dir, tmp_path / "server.log", "--log-format", "json") as process:
        with process.client() as http:
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            assert http.post("/v1/completions", json={"prompt": "hi", "top_k": -1}).status_code == 400
            assert http.get("/nope").status_code == 404
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    records = json_records(process.log())  # raises on any line that is not JSON
    starting = [r for r in records if r.get("event") == "starting"]
    assert starting and starting[0]["url"] == process.url and starting[0]["model"] == tiny_model_dir.name
    assert records[-1].get("event") == "stopped"
    assert {r["status"] for r in records if r["logger"] == "llmkit.access"} >= {200, 400, 404}


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit", "serve", *args], capture_output=True, text=True, timeout=60)


def test_json_log_format_reports_startup_failures_as_json(tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port_in_use = run_serve(
            "-m", str(tiny_model_dir), "--port", str(taken.getsockname()[1]), "--log-format", "json"
        )
    bad_option = run_serve("-m", str(tiny_model_dir), "--max-connections", "0", "--log-format", "json")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    load_failure = run_serve("-m", str(broken), "--port", str(free_port()), "--log-format", "json")
    for result, code, words in (
        (port_in_use, 1, "cannot listen on"),
        (bad_option, 2, "max-connections"),
        (load_failure, 1, "could not load the model"),
    ):
        assert result.stdout == ""
        records = json_records(result.stderr)  # raises on any line that is not JSON
        assert result.returncode == code, result.stderr
        assert records[-1]["level"] == "error" and words in records[-1]["message"], records[-1]


def test_json_log_format_turns_warnings_and_thread_crashes_into_json():
    code = (
        "import threading, warnings\nfrom llmkit.server import logs\nlogs.configure('json')\n"
        "warnings.warn('a library warns')\nlogs.route_library_logging()\n"
        "from transformers.utils import logging as hf\nhf.get_logger('transformers.x').error('from transformers')\n"
        "thread = threading.Thread(target=lambda: 1 / 0, name='worker')\nthread.start()\nthread.join()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    records = json_records(result.stderr)  # raises on any line that is not JSON
    assert [r["logger"] for r in records] == ["py.warnings", "transformers.x", "llmkit.crash"], records
    assert "ZeroDivisionError" in records[-1]["traceback"] and "worker" in records[-1]["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--idle-timeout", "0"], "idle-timeout must be more than 0"),
        (["--read-timeout", "-1"], "read-timeout must be more than 0"),
        (["--max-connections", "0"], "max-connections must be at least 1"),
        (["--forwarded-allow-ips", "10.0.0.300"], "forwarded-allow-ips must be"),
        (["--forwarded-allow-ips", "*,10.0.0.1"], "forwarded-allow-ips must be"),
    ],
)
def test_bad_connection_options_exit_2_before_loading(cli, tmp_path, args, message):
    result = cli("serve", "-m", str(tmp_path / "no-such-model.gguf"), *args)
    assert result.exit_code == 2 and message in result.stderr


def test_forwarded_allow_ips_are_normalized():
    from llmkit.server.settings import parse_forwarded_allow_ips

    assert parse_forwarded_allow_ips(None) == () and parse_forwarded_allow_ips(" ") == ()
    assert parse_forwarded_allow_ips("*") == ("*",)
    assert parse_forwarded_allow_ips("127.0.0.1, 10.1.2.3/8, ::1") == ("127.0.0.1", "10.0.0.0/8", "::1")
