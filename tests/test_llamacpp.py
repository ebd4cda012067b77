"""The llama.cpp engine (extra llmkit[llamacpp]) on a tiny GGUF written by the test: the same
generate / stream / stop / seed behaviour as the transformers engine, and the same numbers."""

import json
import math

import pytest

from llmkit.engine import load_engine
from llmkit.errors import UnsupportedFeature
from llmkit.params import parse_params
from tests.tiny_gguf import write_tiny_gguf

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]' from the checkout)"
)

PROMPT = "hello world"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    return load_engine(str(tiny_gguf), engine="llama.cpp")


def test_info(llama):
    assert llama.info.engine == "llama.cpp" and llama.info.device == "cpu"
    assert llama.info.dtype == "ALL_F32" and llama.info.parameters > 0
    assert llama.info.context_length == 256


def test_greedy_is_deterministic_and_streams_add_up(llama):
    params = parse_params(greedy=True, max_new_tokens=10)
    first, second = llama.generate(PROMPT, params), llama.generate(PROMPT, params)
    assert first.completions[0].token_ids == second.completions[0].token_ids
    generation = llama.stream(PROMPT, params)
    chunks = list(generation)
    assert "".join(c.text for c in chunks) == generation.result.text == first.text
    assert generation.result.usage.completion_tokens == len(first.completions[0].token_ids)


def test_seeds_and_sequences(llama):
    params = parse_params(seed=5, temperature=1.2, top_k=0, max_new_tokens=12, num_sequences=2)
    a, b = llama.generate(PROMPT, params), llama.generate(PROMPT, params)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    alone = llama.generate(PROMPT, params.model_copy(update={"seed": 6, "num_sequences": 1}))
    assert alone.completions[0].token_ids == a.completions[1].token_ids  # sequence i uses seed + i


def test_stop_cuts_before_the_stop_text(llama):
    free = llama.generate(PROMPT, parse_params(greedy=True, max_new_tokens=20)).text
    stop = free[2:4]
    cut = llama.generate(PROMPT, parse_params(greedy=True, max_new_tokens=20, stop=[stop]))
    assert cut.text == free[: free.find(stop)] and cut.completions[0].finish_reason == "stop"


def test_same_model_same_numbers_as_transformers(llama, tiny_gguf, cache_dir):
    """The GGUF through transformers (converted) and through llama.cpp: same tokens, same log-probs."""
    hf = load_engine(str(tiny_gguf), dtype="float32")
    ids = hf.prompt_ids("The quick brown fox jumps over the lazy dog.")
    assert llama.prompt_ids("The quick brown fox jumps over the lazy dog.") == ids
    for ours, theirs in zip(llama.token_logprobs(ids), hf.token_logprobs(ids)):
        assert ours == pytest.approx(theirs, abs=1e-3)
    logits_a, logits_b = llama.next_token_logits(PROMPT), hf.next_token_logits(PROMPT)
    assert (logits_a - logits_b).abs().max().item() < 1e-3
    assert math.isfinite(sum(llama.token_logprobs(ids)))


def test_what_it_cannot_do_is_a_clear_error(tiny_model_dir, tiny_gguf):
    with pytest.raises(UnsupportedFeature, match="loads GGUF files"):
        load_engine(str(tiny_model_dir), engine="llama.cpp")
    with pytest.raises(UnsupportedFeature, match="drop --dtype"):
        load_engine(str(tiny_gguf), engine="llama.cpp", dtype="bfloat16")
    with pytest.raises(UnsupportedFeature, match="runs on the CPU"):
        load_engine(str(tiny_gguf), engine="llama.cpp", device="cuda")


def test_cli_generate_and_bad_engine(cli, tiny_gguf):
    result = cli(
        "generate", "-m", str(tiny_gguf), "--engine", "llama.cpp", "--greedy", "--max-new-tokens", "5", "--json", PROMPT
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["usage"]["completion_tokens"] >= 1
    bad = cli("generate", "-m", str(tiny_gguf), "--engine", "vllm", PROMPT)
    assert bad.exit_code == 2 and "engine must be one of transformers, llama.cpp" in bad.stderr


def test_monitor_compare_and_explore_take_the_engine(cli, tiny_gguf, cache_dir):
    monitor = cli(
        "monitor",
        "-m",
        str(tiny_gguf),
        "--engine",
        "llama.cpp",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert monitor.exit_code == 0, monitor.stderr
    assert json.loads(monitor.stdout)["model"]["engine"] == "llama.cpp"
    compare = cli(
        "compare",
        str(tiny_gguf),
        "--engine",
        "transformers",
        "--engine",
        "llama.cpp",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "4",
        "--format",
        "json",
    )
    assert compare.exit_code == 0, compare.stderr
    rows = json.loads(compare.stdout)["rows"]
    assert [r["engine_name"] for r in rows] == ["transformers", "llama.cpp"]
    assert rows[0]["bits_per_byte"] == pytest.approx(rows[1]["bits_per_byte"], rel=1e-3)
    explore = cli("explore", "next-token", "-m", str(tiny_gguf), "--engine", "llama.cpp", "--json", PROMPT)
    assert explore.exit_code == 0, explore.stderr


def test_truncated_gguf_is_one_clear_error(tiny_gguf, tmp_path):
    from llmkit.errors import ModelLoadError
    from tests.tiny_gguf import truncate_copy

    cut = truncate_copy(tiny_gguf, tmp_path / "cut.gguf", keep_fraction=0.6)
    with pytest.raises(ModelLoadError, match="llama.cpp could not load"):
        load_engine(str(cut), engine="llama.cpp")


def test_llama_cpp_log_lines_go_to_the_logger_not_stderr(caplog, capfd):
    """Gemma 3's "using full-size SWA cache" notice arrives tagged ERROR and used to land in the text."""
    import ctypes

    from llmkit.engine.llamacpp import route_llama_logs

    route_llama_logs()
    import llmkit.engine.llamacpp as module

    with caplog.at_level("DEBUG", logger="llmkit.llamacpp"):
        module._log_callback(3, b"llama_kv_cache_iswa: using full-size SWA cache\n", ctypes.c_void_p(0))
    assert "using full-size SWA cache" in caplog.text
    assert "SWA" not in capfd.readouterr().err


def test_user_defined_markers_are_hidden_but_other_user_tokens_stay_text(tmp_path):
    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "markers.gguf", user_defined=("<start_of_image>", "[multimodal]", "hello_world"))
    tokenizer = load_engine(str(path), engine="llama.cpp").tokenizer
    ids = tokenizer("sea<start_of_image>[multimodal]hello_world", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    assert tokenizer.decode(ids) == "seahello_world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "sea<start_of_image>[multimodal]hello_world"
