"""The app in-process (FastAPI's TestClient runs its lifespan): health states, load failure, settings, CLI checks."""

import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient

from llmkit.errors import InvalidParams, ModelLoadError
from llmkit.server.app import build_app
from llmkit.server.middleware import TokenBuckets
from llmkit.server.settings import RateLimit, ServerSettings, parse_rate_limit


def wait_for(client, status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.json()["status"] == status:
            return response
        time.sleep(0.02)
    raise AssertionError(f"/health never said {status}: {response.json()}")


def test_health_reports_a_stuck_loop_and_a_dead_one(tiny_engine, monkeypatch):
    monkeypatch.setenv("LLMKIT_TEST_STEP_DELAY", "0.6")
    app = build_app(tiny_engine, ServerSettings(stall_after_s=0.2))
    with TestClient(app) as client:
        wait_for(client, "ok")
        worker = threading.Thread(
            target=client.post, args=("/v1/completions",), kwargs={"json": {"prompt": "hi", "max_tokens": 1}}
        )
        worker.start()
        stuck = wait_for(client, "stuck")  # busy, and no step finished for longer than stall_after_s
        assert stuck.status_code == 503 and stuck.json()["seconds_since_last_step"] >= 0.2
        worker.join()
        wait_for(client, "ok")
        app.state.host.scheduler.abort()  # the loop exits as if it had died
        dead = wait_for(client, "error")
        assert dead.status_code == 503 and "not running" in dead.json()["error"]
        refused = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "model_not_ready"


def test_model_that_fails_to_load_reports_error_and_stops_the_server():
    def broken_loader():
        time.sleep(0.3)
        raise ModelLoadError("could not read the model files in /nowhere")

    stopped = []
    app = build_app(broken_loader, ServerSettings(model_name="broken"))
    app.state.host.on_fatal = stopped.append
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading", "model": "broken"}
        early = client.post("/v1/completions", json={"prompt": "hi"})
        assert early.status_code == 503 and early.headers["retry-after"] == "5"
        assert client.post("/v1/completions", json={"prompt": "hi", "top_k": -1}).status_code == 400  # validated first
        failed = wait_for(client, "error")
        assert "could not read the model files" in failed.json()["error"]
    assert stopped and "could not read" in stopped[0]


def test_chat_needs_a_chat_template(tiny_model_no_chat_dir):
    from llmkit.engine import load_engine

    app = build_app(load_engine(str(tiny_model_no_chat_dir), device="cpu"), ServerSettings())
    with TestClient(app) as client:
        wait_for(client, "ok")
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "has no chat template" in response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_settings_checks_and_secret_repr():
    assert parse_rate_limit("60/minute") == RateLimit(60, 60.0)
    assert parse_rate_limit("5 / second") == RateLimit(5, 1.0) and parse_rate_limit(None) is None
    for bad in ("60", "0/minute", "5/fortnight", "x/minute"):
        with pytest.raises(InvalidParams):
            parse_rate_limit(bad)
    settings = ServerSettings(api_key="hunter2")
    assert "hunter2" not in repr(settings) and "***" in repr(settings)
    with pytest.raises(InvalidParams, match="port must be between"):
        ServerSettings(port=70000).check()
    with pytest.raises(InvalidParams, match="log-format"):
        ServerSettings(log_format="xml").check()
    assert ServerSettings(host="::1").is_loopback and not ServerSettings(host="0.0.0.0").is_loopback


def test_token_buckets_refill_over_time():
    buckets = TokenBuckets(RateLimit(2, 60.0))
    assert buckets.take("a", now=0.0) == 0.0 and buckets.take("a", now=0.0) == 0.0
    wait = buckets.take("a", now=1.0)
    assert 28 < wait < 30  # one token per 30 s
    assert buckets.take("b", now=1.0) == 0.0  # per client
    assert buckets.take("a", now=31.0) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "port must be between 1 and 65535"),
        (["--rate-limit", "lots"], "rate limit must look like 60/minute"),
        (["--max-batch-size", "0"], "max-batch-size must be at least 1"),
        (["--request-timeout", "0"], "request-timeout must be more than 0"),
        (["--log-format", "xml"], "log-format must be one of text, json"),
        (["--device", "gpu"], "device must be auto"),
    ],
)
def test_bad_serve_options_exit_2_before_loading(cli, tmp_path, args, message):
    result = cli("serve", "-m", str(tmp_path / "no-such-model.gguf"), *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_serve_help_and_errors_do_not_import_torch_or_fastapi():
    code = (
        "import sys\nfrom llmkit.cli import main\nsys.argv = ['llmkit', 'serve'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    for args in (["--help"], ["--port", "0"]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY []" in result.stderr, result.stderr


def test_port_in_use_is_one_clear_line(cli, tiny_model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "-m", str(tiny_model_dir), "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.stderr


def test_error_after_the_stream_started_is_a_final_sse_event(tiny_engine, monkeypatch):
    import json

    from tests.server_helpers import seed_without_eos

    seed = seed_without_eos(tiny_engine, "tick", 100)
    monkeypatch.setenv("LLMKIT_TEST_STEP_DELAY", "0.02")
    app = build_app(tiny_engine, ServerSettings(request_timeout_s=0.6))
    with TestClient(app) as client:
        wait_for(client, "ok")
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "tick", "max_tokens": 100, "seed": seed, "stream": True}
        ) as response:
            assert response.status_code == 200  # the first token came in time
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["type"] == "timeout" and "request-timeout" in error["message"]
    assert len(lines) > 3  # some text arrived before the error


def test_json_log_lines_drop_uvicorns_terminal_colour_copy():
    import json
    import logging

    from llmkit.server.logs import JsonFormatter

    record = logging.LogRecord("uvicorn", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    record.request_id = "abc"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Started server process [42]" and entry["request_id"] == "abc"
    assert "color_message" not in entry
