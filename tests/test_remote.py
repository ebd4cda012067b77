"""A model can be a URL: the remote engine against real OpenAI-compatible servers on this machine.

Three servers, one of each per module:
- `llmkit serve` on the tiny test model (its own server, today without logprobs or echo);
- `python -m llama_cpp.server` (llama-cpp-python's server, nobody here wrote it) on the tiny GGUF;
- a small fake server in a thread, backed by llmkit's llama.cpp engine on the same GGUF, with two
  personalities: /good (logprobs, top_logprobs and echo computed right, process figures on /metrics, a key,
  two models) and /bare (an Ollama-like server: it ignores logprobs, echo, top_k and min_p, no /metrics).

Every command is run against them as a user would (the CLI in-process; compare's workers as processes):
greedy text equals the local engine's, a seed against llmkit serve gives local generate's text, perplexity
through echo equals the local figure where the server's log-probs are right and is "n/a (why)" where they
are missing or shifted (llama_cpp.server 0.3.x), and a missing capability is one line.

llama_cpp.server detokenizes each token on its own and drops the bytes of a character split across tokens
(the tiny random model produces many), so its text is compared with the local llama.cpp engine's on their
ASCII characters; the token counts are compared whole.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from llmkit.engine.base import TextToken
from llmkit.params import parse_params
from tests.server_helpers import ServerProcess, free_port, llama_cpp_server
from tests.tiny_gguf import write_tiny_gguf

KEY = "test-key"
PROMPT = "hello world"


def ascii_text(text: str) -> str:
    return "".join(c for c in text if c.isascii())


def run_json(cli, *args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("remote-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def llama(gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llmkit.engine import load_engine

    return load_engine(str(gguf), engine="llama.cpp")


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    from llmkit.engine import load_engine

    return load_engine(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("remote-serve") / "serve.log", "--device", "cpu") as s:
        yield s.url + "/v1"


@pytest.fixture(scope="module")
def llama_server(gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("remote-llama") / "server.log"
    with llama_cpp_server(gguf, log, "--n_ctx", "256") as url:
        yield url + "/v1"


class FakeServer:
    """An OpenAI-compatible server in a thread, computing with llmkit's llama.cpp engine (see the module docstring)."""

    METRICS = (
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n"
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{{model_name="tiny-a"}} 0.25\n'
    )

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()

    # --- answering ---

    def handle(self, handler, method: str):
        personality, _, path = handler.path.lstrip("/").partition("/")
        path = "/" + path
        length = int(handler.headers.get("content-length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}") if method == "POST" else {}
        self.requests.append((personality, path, body))
        good = personality == "good"
        if good and handler.headers.get("authorization") != f"Bearer {KEY}":
            return self.send(handler, 401, {"error": {"message": "invalid api key", "type": "auth"}})
        if method == "GET" and path == "/v1/models":
            names = ["tiny-a", "tiny-b"] if good else ["bare"]
            return self.send(handler, 200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        if method == "GET" and path == "/metrics" and good:
            text = self.METRICS.format(rss=123_456_789, cpu=time.process_time())
            return self.send(handler, 200, text, "text/plain; version=0.0.4")
        if method == "POST" and path == "/v1/completions":
            from llmkit.errors import InvalidParams

            with self.lock:
                try:
                    return self.complete(handler, body, good)
                except InvalidParams as exc:  # e.g. a prompt over the context: a 400, as servers answer
                    return self.send(handler, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
        return self.send(handler, 404, {"error": {"message": f"no {method} {path}", "type": "not_found"}})

    def send(self, handler, status: int, body, content_type: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def scores(self, ids: list[int]) -> list[tuple[float, str, float]]:
        """Per position j >= 1: (log p(ids[j] | ids[:j]), the most likely token's text, its log p)."""
        import torch

        engine, rows = self.engine, []
        engine.llm.reset()
        for position in range(len(ids) - 1):
            engine.llm.eval([ids[position]])
            logprobs = torch.log_softmax(engine._logits()[0].float(), dim=-1)
            best = int(logprobs.argmax())
            rows.append((float(logprobs[ids[position + 1]]), self.text([best]), float(logprobs[best])))
        return rows

    def text(self, ids) -> str:
        return self.engine.tokenizer.decode(list(ids))

    def logprobs_block(self, ids: list[int], scored: list, start: int, offset0: int):
        """Token texts and offsets as servers make them, by decoding incrementally from `start`."""
        texts, offsets = [], []
        for j in range(start, len(ids)):
            before = self.text(ids[start:j])
            texts.append(self.text(ids[start : j + 1])[len(before) :])
            offsets.append(offset0 + len(before))
        values, tops = [], []
        for j in range(start, len(ids)):
            if j == 0:
                values.append(None)
                tops.append(None)
            else:
                value, best, best_value = scored[j - 1]
                values.append(value)
                tops.append({best: best_value, self.text([ids[j]]): value})
        return {"tokens": texts, "token_logprobs": values, "text_offset": offsets, "top_logprobs": tops}

    def complete(self, handler, body: dict, good: bool):
        engine = self.engine
        prompt = body["prompt"]
        ids = engine.prompt_ids(prompt)
        if len(ids) + body.get("max_tokens", 16) > 200:
            message = f"Requested tokens ({len(ids) + body.get('max_tokens', 16)}) exceed context window of 200"
            return self.send(handler, 400, {"error": {"message": message, "type": "invalid_request_error"}})
        knobs = {"top_k": body.get("top_k", 0), "min_p": body.get("min_p", 0.0)} if good else {"top_k": 0}
        temperature = body.get("temperature", 1.0)
        params = parse_params(
            greedy=temperature == 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=body.get("top_p", 1.0),
            max_new_tokens=body.get("max_tokens", 16),
            seed=body.get("seed"),
            stop=body.get("stop") or [],
            **knobs,
        )
        result = engine.generate(prompt, params)
        generated = list(result.completions[0].token_ids)
        want = good and body.get("logprobs") is not None
        block = None
        if want:
            full = ids + generated
            scored = self.scores(full)
            echo = bool(body.get("echo"))
            block = self.logprobs_block(full, scored, 0 if echo else len(ids), 0 if echo else len(prompt))
            count = max(1, int(body["logprobs"]))
            if not echo:  # top_logprobs of the first generated position: the whole distribution's top `count`
                import torch

                engine.llm.reset()
                engine.llm.eval(ids)
                logprobs = torch.log_softmax(engine._logits()[0].float(), dim=-1)
                values, top_ids = torch.topk(logprobs, count)
                block["top_logprobs"][0] = {self.text([int(i)]): float(v) for i, v in zip(top_ids, values)}
        text = (prompt if good and body.get("echo") else "") + result.completions[0].text
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(generated),
            "total_tokens": len(ids) + len(generated),
        }
        finish = result.completions[0].finish_reason
        if not body.get("stream"):
            choice = {"index": 0, "text": text, "logprobs": block, "finish_reason": finish}
            return self.send(handler, 200, {"object": "text_completion", "choices": [choice], "usage": usage})
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.end_headers()
        pieces = [self.text(generated[: i + 1])[len(self.text(generated[:i])) :] for i in range(len(generated))]
        for i, piece in enumerate(pieces):
            lp = None
            if block:
                lp = {key: [values[i]] for key, values in block.items()}
            event = {"choices": [{"index": 0, "text": piece, "logprobs": lp, "finish_reason": None}]}
            handler.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        last = {"choices": [{"index": 0, "text": "", "finish_reason": finish}]}
        handler.wfile.write(
            f"data: {json.dumps(last)}\n\ndata: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        )
        handler.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def fake(llama):
    server = FakeServer(llama)
    yield server
    server.close()


@pytest.fixture()
def keyless(monkeypatch):
    for name in ("LLMKIT_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


# --- references and refusals, before anything is sent ----------------------------------------------------------


def test_a_url_is_checked_before_anything_is_sent(cli, keyless):
    bad = cli("generate", "-m", "http://", "hi")
    assert bad.exit_code == 2 and "the model URL has no host" in bad.stderr
    local_only = cli("generate", "--remote-model", "x", "--max-new-tokens", "2", "hi")
    assert local_only.exit_code == 2 and "--remote-model names a model on a server" in local_only.stderr
    refused = cli("serve", "-m", "http://127.0.0.1:9/v1")
    assert refused.exit_code == 2 and "is already a server" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    nothing = cli("generate", "-m", f"http://127.0.0.1:{free_port()}/v1", "hi")
    assert nothing.exit_code == 1 and "connection refused" in nothing.stderr
    device = cli("generate", "-m", "http://127.0.0.1:9/v1", "--dtype", "float32", "hi")
    assert device.exit_code == 2 and "--dtype is the server's setting" in device.stderr


def test_stop_text_never_leaks_and_split_characters_are_joined():
    from llmkit.engine.remote import _Sequence

    sequence = _Sequence(0, ["END"])
    shown = [sequence.feed(piece) for piece in ("one E", "N", "D two")]
    assert "".join(shown) == "one " and sequence.stopped
    emoji = _Sequence(0, [])
    shown = [emoji.feed(piece) for piece in ("a\ud83d", "\ude00b")]
    assert "".join(shown) + emoji.finish() == "a\U0001f600b"
    lone = _Sequence(0, [])
    assert lone.feed("x\ud83d") + lone.finish() == "x\ufffd"


# --- llmkit serve ---------------------------------------------------------------------------------------------


def test_generate_against_llmkit_serve_gives_the_local_text(cli, serve, local, keyless):
    settings = (
        {"greedy": True},
        {"seed": 7},
        {"seed": 11, "num_sequences": 2, "temperature": 1.2, "top_p": 0.9},
        {"seed": 7, "stop": ["lD"]},
    )
    flags = (("--greedy",), ("--seed", "7"), ("--seed", "11", "-n", "2", "--temp", "1.2", "--top-p", "0.9"))
    for values, args in zip(settings, (*flags, ("--seed", "7", "--stop", "lD"))):
        here = local.generate(PROMPT, parse_params(max_new_tokens=12, **values))
        there = run_json(cli, "generate", "-m", serve, "--max-new-tokens", "12", *args, "--json", PROMPT)
        assert [c["text"] for c in there["completions"]] == [c.text for c in here.completions], args
        assert there["usage"]["completion_tokens"] == here.usage.completion_tokens
        assert there["usage"]["prompt_tokens"] == here.usage.prompt_tokens and there["seed"] == here.seed
        assert there["engine"]["engine"] == "remote"
    assert "lD" not in there["completions"][0]["text"]
    streamed = cli("generate", "-m", serve, "--max-new-tokens", "12", "--seed", "7", PROMPT)
    expected = local.generate(PROMPT, parse_params(max_new_tokens=12, seed=7)).text
    assert streamed.exit_code == 0 and streamed.stdout == f"{expected}\n" and "TTFT" in streamed.stderr


def test_chat_against_llmkit_serve_gives_the_local_replies(cli, serve, local, keyless):
    """llmkit chat -m URL sends the whole conversation to /v1/chat/completions: the server's template, llmkit's
    text, turn after turn."""
    from llmkit.cli.chat import one_line

    result = cli("chat", "-m", serve, "--greedy", "--max-new-tokens", "8", input="hello there\nhow are you\n")
    assert result.exit_code == 0, result.output
    replies = []
    history: list[dict[str, str]] = []
    for text in ("hello there", "how are you"):
        history.append({"role": "user", "content": text})
        generation = local.session().stream(list(history), parse_params(greedy=True, max_new_tokens=8))
        replies.append("".join(chunk.text for chunk in generation))
        history.append({"role": "assistant", "content": replies[-1]})
    assert result.stdout.splitlines() == [one_line(reply) for reply in replies]


def test_structured_output_against_a_server_is_refused_not_pretended(cli, serve, keyless):
    """llmkit enforces constraints in its own decode loop; against a server it says so rather than send a
    response_format that a server may silently ignore."""
    pytest.importorskip("llguidance")
    refused = cli("generate", "-m", serve, "--json-object", "--max-new-tokens", "4", PROMPT)
    assert refused.exit_code == 2, refused.stderr
    assert "structured output" in refused.stderr and "local models only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == ""


def test_explore_against_llmkit_serve(cli, serve, local, keyless):
    from llmkit.explore import grid_knobs, parse_grid, plan_sweep, run_sweep

    grid = ["temperature=0.7,1.3", "top_k=0,20"]
    plan = plan_sweep(grid_knobs(parse_grid(grid)), samples=2, seed=0, fixed={"max_new_tokens": 6})
    here = run_sweep(local, PROMPT, plan)
    args = ("--samples", "2", "--max-new-tokens", "6", "--param", grid[0], "--param", grid[1])
    result = cli("explore", "-m", serve, *args, "--json", PROMPT)
    assert result.exit_code == 0, result.output
    there = json.loads(result.stdout)
    texts = [[s["text"] for s in setting["samples"]] for setting in there["settings"]]
    assert texts == [[s.text for s in setting.samples] for setting in here.settings]
    assert there["prompt_tokens"] == here.prompt_tokens
    logp = [setting["metrics"]["mean_logprob"] for setting in there["settings"]]
    if logp[0] is None:  # no logprobs: the note says why, in one line
        assert "the server returns no logprobs" in result.stderr
    else:  # the server's logprobs of the same tokens: the unmodified model's, as explore's own
        assert logp == pytest.approx([setting.metrics.mean_logprob for setting in here.settings], abs=1e-3)
    missing = cli("explore", "next-token", "-m", serve, PROMPT)
    from llmkit.engine import load_engine

    engine = load_engine(serve)
    offered = engine.info.capabilities.top_logprobs
    engine.close()
    if offered:
        assert missing.exit_code == 0, missing.output
    else:
        assert missing.exit_code == 2
        assert "explore next-token needs the server's top_logprobs" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1


def test_next_token_against_llmkit_serve_when_it_offers_top_logprobs(cli, serve, local, keyless):
    from llmkit.engine import load_engine

    engine = load_engine(serve)
    capabilities = engine.info.capabilities
    engine.close()
    if not capabilities.top_logprobs:
        pytest.skip(f"llmkit serve offers no top_logprobs yet ({capabilities.missing.get('top_logprobs')})")
    view = run_json(cli, "explore", "next-token", "-m", serve, "--top", "5", "--json", PROMPT)
    import torch

    probs = torch.softmax(local.next_token_logits(PROMPT), dim=-1)
    top = torch.topk(probs, 5)
    assert view["partial"] and view["settings"][0]["rows"][0]["model_prob"] == pytest.approx(
        float(top.values[0]), rel=1e-3
    )


def test_monitor_against_llmkit_serve(cli, serve, keyless):
    report = run_json(cli, "monitor", "-m", serve, "--runs", "2", "--warmup", "1", "--max-new-tokens", "8", "--json")
    assert [run["generated_tokens"] for run in report["runs"]] == [8, 8]
    assert report["summary"]["ttft_s"]["count"] == 2 and report["summary"]["tpot_s"] is not None
    assert report["model"]["engine"] == "remote" and report["config"]["prompt_tokens"] > 0
    server = report["server"]
    # llmkit serve's /metrics has the server process's own figures (Prometheus' process collector)
    assert server["readings"] >= 2 and server["measured"]
    assert 10 * 2**20 < server["rss_peak_bytes"] < 8 * 2**30 and server["cpu_percent"] > 0


# --- llama_cpp.server -------------------------------------------------------------------------------------------


def test_generate_against_llama_cpp_server_gives_the_local_greedy_text(cli, llama_server, llama, keyless):
    here = llama.generate(PROMPT, parse_params(greedy=True, max_new_tokens=16))
    there = run_json(cli, "generate", "-m", llama_server, "--greedy", "--max-new-tokens", "16", "--json", PROMPT)
    assert ascii_text(there["completions"][0]["text"]) == ascii_text(here.text)
    assert there["usage"]["prompt_tokens"] == here.usage.prompt_tokens
    assert there["usage"]["completion_tokens"] == here.usage.completion_tokens
    # repeat_penalty went as 1.0 (its default is 1.1): the text is plain greedy, which the equality above shows


def test_explore_against_llama_cpp_server(cli, llama_server, gguf, llama, keyless):
    sweep = run_json(
        cli, "explore", "-m", llama_server, "--param", "greedy=true", "--max-new-tokens", "8", "--json", PROMPT
    )
    sample = sweep["settings"][0]["samples"][0]
    local = llama.generate(PROMPT, parse_params(greedy=True, max_new_tokens=8))
    ids = llama.prompt_ids(PROMPT)
    expected = llama.token_logprobs([*ids, *local.completions[0].token_ids])[len(ids) - 1 :]
    assert sample["tokens"] == 8 and sample["mean_logprob"] == pytest.approx(sum(expected) / 8, abs=1e-3)
    view = run_json(cli, "explore", "next-token", "-m", llama_server, "--top", "5", "--top-k", "3", "--json", PROMPT)
    assert view["partial"] and view["cap"] == 20 and 0 < view["shown_mass"] < 1
    import torch

    best = float(torch.softmax(llama.next_token_logits(PROMPT), dim=-1).max())
    assert view["settings"][0]["rows"][0]["model_prob"] == pytest.approx(best, rel=1e-4)
    table = cli("explore", "next-token", "-m", llama_server, "--top", "5", PROMPT)
    assert table.exit_code == 0 and "it returns at most 20" in table.stdout and "of the probability" in table.stdout


def test_monitor_against_llama_cpp_server(cli, llama_server, keyless):
    report = run_json(
        cli, "monitor", "-m", llama_server, "--runs", "2", "--warmup", "0", "--max-new-tokens", "8", "--json"
    )
    assert [run["generated_tokens"] for run in report["runs"]] == [8, 8]
    assert report["server"]["note"] == "remote: not measured (the server has no Prometheus /metrics)"
    table = cli("monitor", "-m", llama_server, "--runs", "1", "--warmup", "0", "--max-new-tokens", "4")
    assert "Server: remote: not measured" in table.stdout


# --- compare: local and remote rows, mixed -----------------------------------------------------------------------


def test_compare_mixes_local_and_remote_rows(cli, serve, llama_server, tiny_model_dir, gguf, keyless):
    args = ("--runs", "1", "--warmup", "0", "--max-new-tokens", "8", "--window", "128", "--format", "json")
    document = run_json(cli, "compare", str(tiny_model_dir), serve, llama_server, *args)
    local, served, llama = document["rows"]
    assert all(row["ok"] for row in document["rows"]), document["rows"]
    assert served["sample"] == local["sample"]  # greedy, the same model: the same text
    assert served["disk_bytes"] is None and served["parameters"] is None and served["load_s"] > 0
    # llama_cpp.server's echoed prompt log-probs are shifted by one token: no number, the reason instead
    assert llama["perplexity"] is None and llama["perplexity_na"] == "prompt logprobs shifted by one token"
    if served["perplexity"] is None:
        assert served["perplexity_na"] == "server has no prompt logprobs"
    else:  # llmkit serve with echo: its figure within a tolerance of the local one (its own windows)
        assert served["perplexity"] == pytest.approx(local["perplexity"], rel=0.05)
    import io

    from rich.console import Console

    from llmkit.cli import render
    from llmkit.compare import CompareSpec

    console = Console(width=250, file=io.StringIO(), color_system=None, record=True)
    render.compare_table(
        document["rows"], CompareSpec(models=(str(tiny_model_dir), serve, llama_server)), console, wide=True
    )
    shown = console.export_text()
    assert "n/a (prompt logprobs shifted by one token)" in shown and "remote: not measured" in shown
    assert "llama_cpp.server 0.3.x does this" in shown


# --- a server that computes everything right, and one that offers little -----------------------------------------


def test_perplexity_through_echo_equals_the_local_figure(fake, llama, keyless):
    from llmkit.compare import perplexity_by_echo, perplexity_of, reference_text
    from llmkit.engine import load_engine

    engine = load_engine(fake.url + "/good/v1#tiny-b", api_key=KEY)
    assert engine.info.model == "tiny-b" and engine.info.capabilities.prompt_logprobs
    text = reference_text()[:900]
    there = perplexity_by_echo(engine, text, 128, 64)
    here = perplexity_of(llama, text, 128, 64)
    assert engine.probe.alignment == "ok" and there.windows > 2
    assert there.perplexity == pytest.approx(here.perplexity, rel=0.02)
    assert there.predicted_tokens == pytest.approx(here.predicted_tokens, abs=2)
    engine.close()


def test_monitor_reads_the_servers_own_memory_and_cpu(cli, fake, monkeypatch):
    monkeypatch.setenv("LLMKIT_API_KEY", KEY)
    report = run_json(
        cli, "monitor", "-m", fake.url + "/good/v1", "--runs", "2", "--warmup", "0", "--max-new-tokens", "4", "--json"
    )
    server = report["server"]
    assert server["measured"] and server["rss_peak_bytes"] == 123_456_789 and server["kv_cache_usage_peak"] == 0.25
    table = cli("monitor", "-m", fake.url + "/good/v1", "--runs", "1", "--warmup", "0", "--max-new-tokens", "4")
    assert "Server (its /metrics" in table.stdout and "KV cache peak 25%" in table.stdout


def test_keys_and_model_names(cli, fake, keyless, monkeypatch):
    url = fake.url + "/good/v1"
    missing = cli("generate", "-m", url, "hi")
    assert missing.exit_code == 2 and "no key was given" in missing.stderr and "--api-key" in missing.stderr
    wrong = cli("generate", "-m", url, "--api-key", "nope", "hi")
    assert wrong.exit_code == 2 and "the key given was refused" in wrong.stderr
    unknown = cli("generate", "-m", url, "--api-key", KEY, "--remote-model", "nope", "hi")
    assert unknown.exit_code == 2 and "'nope' is not served" in unknown.stderr and "tiny-a, tiny-b" in unknown.stderr
    both = cli("generate", "-m", url + "#tiny-a", "--remote-model", "tiny-b", "hi")
    assert both.exit_code == 2 and "give one" in both.stderr
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    chosen = run_json(cli, "generate", "-m", url, "--remote-model", "tiny-b", "--max-new-tokens", "3", "--json", "hi")
    assert chosen["model"] == "tiny-b"
    assert [body["model"] for _, path, body in fake.requests if path == "/v1/completions"][-1] == "tiny-b"
    first = run_json(cli, "generate", "-m", url, "--max-new-tokens", "3", "--json", "hi")
    assert first["model"] == "tiny-a" and KEY not in json.dumps(first)


def test_a_server_that_offers_little_says_so_in_one_line(cli, fake, keyless, tmp_path):
    url = fake.url + "/bare/v1"
    warned = cli("generate", "-m", url, "--top-k", "5", "--seed", "3", "--max-new-tokens", "4", PROMPT)
    assert warned.exit_code == 0 and f"the server at {fake.url}/bare ignored top_k" in warned.stderr
    sweep = cli("explore", "-m", url, "--param", "top_k=5,10", "--max-new-tokens", "4", PROMPT)
    assert sweep.exit_code == 2 and "ignored top_k" in sweep.stderr and len(sweep.stderr.strip().splitlines()) == 1
    plain = cli("explore", "-m", url, "--param", "temperature=0.5", "--max-new-tokens", "4", "--samples", "1", PROMPT)
    assert plain.exit_code == 0 and "the server returns no logprobs (it ignores logprobs)" in plain.stderr
    next_token = cli("explore", "next-token", "-m", url, PROMPT)
    assert next_token.exit_code == 2 and "needs the server's top_logprobs" in next_token.stderr
    from llmkit.compare import score_text
    from llmkit.engine import load_engine

    engine = load_engine(url)
    assert score_text(engine, "some text to score", 64, 32)[:2] == (None, "server has no prompt logprobs")
    engine.close()


def test_retries_only_where_safe(fake, keyless, monkeypatch):
    """GETs are retried after a 503; a completion that failed is not sent again."""
    from llmkit.engine import load_engine
    from llmkit.engine.remote import Http, parse_model_url
    from llmkit.errors import LlmkitError

    http = Http(parse_model_url(fake.url + "/bare/v1"))
    answers = iter([httpx.Response(503), httpx.Response(200, json={"data": []})])
    sent = []

    def fake_get(url, **kwargs):
        sent.append(url)
        return next(answers)

    monkeypatch.setattr(http.client, "get", fake_get)
    assert http.get("/v1/models") == (200, {"data": []}) and len(sent) == 2
    engine = load_engine(fake.url + "/bare/v1")
    before = len(fake.requests)
    with pytest.raises(LlmkitError):
        engine.generate("x" * 4000, parse_params(greedy=True, max_new_tokens=4))  # refused: over the context
    assert len(fake.requests) == before + 1
    engine.close()


def test_text_logprobs_offsets_follow_the_token_texts():
    from llmkit.engine.remote import _offsets

    assert _offsets(["<s>", "he", "llo"], [0, 3, 5], "hello") == [0, 0, 2]
    assert _offsets(["he", "", "llo"], [0, 2, 2], "he\u00e9llo") == [0, 2, 2]
    assert isinstance(TextToken("a", 0, None), TextToken)


def test_server_watch_summarises_what_the_server_reports():
    from llmkit.measure import ServerWatch

    readings = iter(
        [
            {"process_resident_memory_bytes": 100.0, "process_cpu_seconds_total": 1.0},
            {
                "process_resident_memory_bytes": 300.0,
                "process_cpu_seconds_total": 1.5,
                "llamacpp:kv_cache_usage_ratio": 0.5,
            },
        ]
    )
    watch = ServerWatch(lambda: next(readings, None), interval_s=10)
    watch.start()
    time.sleep(0.05)
    watch.stop()
    summary = watch.summary()
    assert summary["measured"] and summary["rss_peak_bytes"] == 300 and summary["kv_cache_usage_peak"] == 0.5
    assert summary["cpu_percent"] > 0 and not math.isnan(summary["cpu_percent"])
    assert ServerWatch(lambda: None).summary()["note"] == "remote: not measured (the server has no Prometheus /metrics)"


def test_a_partial_next_token_view_is_exact_where_it_says_and_bounds_otherwise():
    """A server's top 20 of a peaked distribution over 1000 tokens against the view of the whole distribution."""
    import torch

    from llmkit.engine.base import TopTokens
    from llmkit.explore import next_token_settings, next_token_view, partial_next_token_view

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=generator) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    values, ids = torch.topk(logprobs, 20)
    top = TopTokens(tuple(f"t{int(i)}" for i in ids), tuple(map(float, values)), (None,) * 20, 3, None, 20)
    knobs = [{"top_k": 5}, {"min_p": 0.3}, {"top_p": 0.5}, {"top_p": 0.999}, {"temperature": 0.5}, {"temperature": 1.5}]
    settings = next_token_settings(knobs)
    full = next_token_view(logits, settings, decode=lambda i: f"t{i}", top=20)
    partial = partial_next_token_view(top, settings)
    assert partial.shown_mass == pytest.approx(float(values.exp().sum()), rel=1e-6)
    for whole, part in zip(full.settings, partial.settings):
        truth = [row.prob for row in whole.rows]
        shown = [row.prob for row in part.rows]
        if part.mark == "":
            assert shown == pytest.approx(truth, abs=1e-5), part.label
            assert [row.cut_by for row in part.rows] == [row.cut_by for row in whole.rows]
        elif part.mark == "≤":
            assert all(s >= t - 1e-6 for s, t in zip(shown, truth)), part.label
    assert [s.mark for s in partial.settings] == ["", "", "", "≈", "≤", "≤"]
    # top-p 0.999 runs past the shown tokens: its cut of each shown token is still exact (none is cut)
    assert [row.cut_by for row in partial.settings[3].rows] == [row.cut_by for row in full.settings[3].rows]
