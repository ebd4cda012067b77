"""The faster configurations: what `auto` picks, and that each one computes what float32 computes.

Tolerances (tiny random model, weights N(0, 0.02)), as docs/performance.md states them:
- float32 (any path): identical greedy tokens and logits.
- float16 / bfloat16 / int8 / bf16 / fp16 weight-only: the log-softmax over a whole teacher-forced sequence stays within
  MAX_LOGPROB_ERROR of float32's; greedy tokens are identical to float32's up to the first step
  where float32's own top-two margin is smaller than twice that error (where a flip is allowed).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from llmkit import devices
from llmkit.engine import LoadOptions, choose_engine, load_engine
from llmkit.engine.fastpath import (
    BF16_GEMV_MAX_ROWS,
    FLOAT16_MAX,
    GEMV_MAX_ROWS,
    Bf16WeightLinear,
    CompactEmbedding,
    Fp16WeightLinear,
    Int8WeightOnlyLinear,
    fp16_weights_supported,
    quantize_bf16,
    quantize_fp16,
    quantize_int8,
)
from llmkit.errors import InvalidParams, UnsupportedFeature
from llmkit.params import GenerationParams

PROMPT = "The quick brown fox"
MAX_LOGPROB_ERROR = {
    ("float16", "none"): 2e-3,
    ("bfloat16", "none"): 1e-2,
    ("auto", "int8"): 2e-2,
    ("auto", "bf16"): 1e-2,
    ("auto", "fp16"): 5e-4,  # float16 keeps 3 more bits of each weight than bfloat16 (1.4e-4 measured)
}
needs_fbgemm = pytest.mark.skipif(not fp16_weights_supported(), reason="fbgemm's float16 kernel (x86 with AVX2)")
GREEDY = GenerationParams(max_new_tokens=32, temperature=0.0)


# --- what auto picks ------------------------------------------------------------------------


def test_native_bf16_flag_reads_cpu_flags():
    assert (
        devices.native_bf16_flag("processor: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n") == "avx512_bf16"
    )
    assert devices.native_bf16_flag("flags : fpu amx_tile amx_bf16\n") == "amx_bf16"
    assert devices.native_bf16_flag("flags : fpu sse2 avx2 fma\n") is None
    assert devices.native_bf16_flag("model name : Apple M2\n") is None


@pytest.mark.parametrize("flag, expected", [("avx512_bf16", torch.bfloat16), (None, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, flag, expected):
    monkeypatch.delenv(devices.DTYPE_ENV, raising=False)
    monkeypatch.setattr(devices, "native_bf16_flag", lambda: flag)
    dtype, why = devices.choose_dtype("auto", "cpu")
    assert dtype == expected
    assert why.startswith("auto:") and (flag or "no native bfloat16") in why


@pytest.mark.parametrize(
    "name, dtype, device, flag, env, fbgemm, batch_rows, expected",
    [
        ("auto", "auto", "cpu", None, None, True, 1, "bf16"),  # one sequence: half float32's memory
        ("auto", "auto", "cpu", None, None, True, 4, "bf16"),  # every step on the gemv path
        ("auto", "auto", "cpu", None, None, True, 5, "fp16"),  # serve's larger batches, where fbgemm runs
        ("auto", "auto", "cpu", None, None, True, 64, "fp16"),
        ("auto", "auto", "cpu", None, None, False, 1, "bf16"),  # no fbgemm (ARM)
        ("auto", "auto", "cpu", None, None, False, 5, "none"),  # ... and larger batches: float32 weights
        ("auto", "auto", "cpu", "avx512_bf16", None, True, 1, "none"),  # auto computes in bfloat16 already
        ("auto", "float32", "cpu", None, None, True, 1, "none"),  # a dtype was asked for
        ("auto", "auto", "cpu", None, "float32", True, 1, "none"),  # ... or set by $LLMKIT_DTYPE
        ("auto", "auto", "cuda", None, None, True, 1, "none"),
        ("bf16", "auto", "cpu", "avx512_bf16", None, True, 16, "bf16"),  # asked for: as asked
        ("fp16", "auto", "cpu", "avx512_bf16", None, True, 16, "fp16"),
        ("none", "auto", "cpu", None, None, True, 1, "none"),
    ],
)
def test_auto_quantize(monkeypatch, name, dtype, device, flag, env, fbgemm, batch_rows, expected):
    from llmkit.engine import fastpath

    if env is None:
        monkeypatch.delenv(devices.DTYPE_ENV, raising=False)
    else:
        monkeypatch.setenv(devices.DTYPE_ENV, env)
    monkeypatch.setattr(devices, "native_bf16_flag", lambda: flag)
    monkeypatch.setattr(fastpath, "fp16_weights_supported", lambda: fbgemm)
    chosen, why = devices.choose_quantize(name, dtype, device, batch_rows=batch_rows)
    assert chosen == expected
    assert why == "set by --quantize" if name != "auto" else why.startswith("auto:")


def test_dtype_env_sets_auto_but_not_an_explicit_dtype(monkeypatch):
    monkeypatch.setenv(devices.DTYPE_ENV, "float16")
    assert devices.choose_dtype("auto", "cpu") == (torch.float16, "LLMKIT_DTYPE=float16")
    assert devices.choose_dtype("bfloat16", "cpu") == (torch.bfloat16, "set by --dtype")
    monkeypatch.setenv(devices.DTYPE_ENV, "int4")
    with pytest.raises(InvalidParams, match="LLMKIT_DTYPE must be one of"):
        devices.choose_dtype("auto", "cpu")


def test_auto_engine_choice(tiny_model_dir, tmp_path):
    assert choose_engine("anything", LoadOptions()) == ("transformers", "set by --engine; default transformers")
    engine, why = choose_engine(str(tiny_model_dir), LoadOptions(engine="auto"))
    assert engine == "transformers" and "folder" in why
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert choose_engine(str(gguf), LoadOptions(engine="auto", dtype="float32"))[0] == "transformers"
    assert choose_engine(str(gguf), LoadOptions(engine="auto", quantize="int8"))[0] == "transformers"
    assert choose_engine(str(gguf), LoadOptions(engine="auto", quantize="bf16"))[0] == "transformers"
    assert choose_engine(str(gguf), LoadOptions(engine="auto", quantize="fp16"))[0] == "transformers"
    engine, why = choose_engine(str(gguf), LoadOptions(engine="auto", device="cpu", quantize="none"))
    from llmkit.engine.llamacpp import llamacpp_installed

    assert engine == ("llama.cpp" if llamacpp_installed() else "transformers"), why


def test_bad_load_options_are_caught_when_the_record_is_made():
    with pytest.raises(InvalidParams, match="quantize must be one of auto, none, int8, bf16"):
        LoadOptions(device="cpu", quantize="int4")
    with pytest.raises(InvalidParams, match="engine must be one of"):
        LoadOptions(engine="vllm")
    with pytest.raises(InvalidParams, match="device must be auto, cpu"):
        LoadOptions(device="gpu")
    with pytest.raises(InvalidParams, match="dtype must be one of"):
        LoadOptions(dtype="fp8")
    with pytest.raises(InvalidParams, match="--threads must be between 1"):
        LoadOptions(threads=0)
    with pytest.raises(TypeError, match="not both"):
        load_engine("anything", LoadOptions(), dtype="float32")


def test_int8_refuses_other_dtypes_and_devices(tiny_model_dir):
    with pytest.raises(InvalidParams, match="computes in bfloat16"):
        load_engine(str(tiny_model_dir), device="cpu", dtype="float32", quantize="int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quantize, weights", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_16_bit_weight_only_refuses_other_dtypes(tiny_model_dir, dtype, quantize, weights):
    with pytest.raises(InvalidParams, match=f"{weights} weights with float32 activations, which --dtype {dtype}"):
        load_engine(str(tiny_model_dir), device="cpu", dtype=dtype, quantize=quantize)


def test_fp16_weight_only_without_its_kernel_says_what_to_use(tiny_model_dir, monkeypatch):
    from llmkit.engine import fastpath

    monkeypatch.setattr(fastpath, "fp16_weights_supported", lambda: False)
    with pytest.raises(InvalidParams, match="needs torch's fbgemm kernel .* use --quantize bf16"):
        load_engine(str(tiny_model_dir), device="cpu", quantize="fp16")


def test_llamacpp_engine_refuses_quantize(tiny_model_dir):
    with pytest.raises(UnsupportedFeature, match="GGUF file's own quantization|needs llama-cpp-python"):
        load_engine(str(tiny_model_dir), engine="llama.cpp", quantize="int8")


# --- int8 weight-only -----------------------------------------------------------------------


def test_int8_linear_error_is_within_its_rounding_bound():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    quantized = Int8WeightOnlyLinear(linear)
    x = torch.randn(5, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), linear.weight.detach(), linear.bias.detach())
    got = quantized(x).float()
    # Each weight is off by at most half a step (scale / 2): |error| <= sum_k |x_k| * scale / 2, plus bfloat16's
    # rounding of the result (2^-8 relative).
    bound = x.float().abs().sum(dim=1, keepdim=True) * quantized.scales.float()[None, :] / 2
    assert torch.all((got - exact).abs() <= bound + exact.abs() * 2**-7 + 1e-3)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() == 127


# --- bfloat16 weight-only ------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, BF16_GEMV_MAX_ROWS, BF16_GEMV_MAX_ROWS + 1, 64])
def test_bf16_weight_linear_computes_with_the_rounded_weights(rows):
    """Larger calls are float32 arithmetic on the bfloat16-rounded weights, to the bit; small ones (gemv on
    bfloat16 rows) are within bfloat16's rounding of the rows; oneDNN's switch is left as it was."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = Bf16WeightLinear(linear)
    assert layer.weight_bf16.dtype == torch.bfloat16 and layer.bias is linear.bias
    x = torch.randn(rows, 64)
    rounded = torch.nn.functional.linear(x, linear.weight.detach().bfloat16().float(), linear.bias.detach())
    got = layer(x)
    assert got.dtype == torch.float32
    if rows > BF16_GEMV_MAX_ROWS:
        assert torch.equal(got, rounded)
    else:
        bound = (x.abs() @ linear.weight.detach().abs().T) * 2**-7 + 1e-5  # rows' rounding plus the result's
        assert torch.all((got - rounded).abs() <= bound)
        assert not torch.equal(got, rounded)  # the rows really went through bfloat16
    assert torch._C._get_mkldnn_enabled()


def test_quantize_bf16_keeps_a_tied_head_tied_and_scaled_embeddings_exact(tmp_path):
    """Tiny Gemma 3 (scaled embeddings, head tied to them): every Linear and the embedding hold bfloat16,
    the head shares the embedding's bfloat16 tensor, and the lookup returns the original's rows rounded."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "gemma", sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    original = model.get_input_embeddings()
    assert model.lm_head.weight is original.weight  # tied in the checkpoint
    ids = torch.arange(0, original.num_embeddings, 7)
    with torch.no_grad():
        expected = torch.nn.functional.embedding(ids, original.weight.bfloat16().float()) * original.embed_scale
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert quantize_bf16(model) == linears > 0
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CompactEmbedding) and isinstance(model.lm_head, Bf16WeightLinear)
    assert model.lm_head.weight_bf16 is embedding.table
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(embedding(ids), expected)
    assert model.dtype == torch.float32


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("quantize", ["bf16", pytest.param("fp16", marks=needs_fbgemm)])
def test_16_bit_weight_only_keeps_nothing_in_the_mapped_checkpoint(tiny_model_dir, quantize):
    """No tensor of the loaded model points into the memory-mapped safetensors file: one that did would keep the
    whole file mapped, and every page the conversion read resident (Gemma 3: 2.1 GiB after load, not 1.1)."""

    def checkpoint_ranges() -> list[tuple[int, int]]:
        ranges = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(".safetensors") and str(tiny_model_dir) in line:
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
        return ranges

    def mapped(engine) -> list[str]:
        ranges = checkpoint_ranges()
        tensors = [*engine.model.named_parameters(), *engine.model.named_buffers()]
        return [name for name, t in tensors if any(start <= t.data_ptr() < end for start, end in ranges)]

    plain = load_engine(str(tiny_model_dir), device="cpu", quantize="none")
    assert mapped(plain)  # float32 weights are read from the mapping: what this test would see
    del plain
    gc.collect()
    assert mapped(load_engine(str(tiny_model_dir), device="cpu", quantize=quantize)) == []


@pytest.mark.parametrize(
    "quantize, linear_class",
    [(quantize_bf16, Bf16WeightLinear), pytest.param(quantize_fp16, Fp16WeightLinear, marks=needs_fbgemm)],
)
def test_16_bit_weight_only_leaves_an_embedding_it_does_not_know(tiny_model_dir, quantize, linear_class):
    """An embedding subclass whose forward is not the plain (or scaled) lookup stays as it is, in float32."""
    from transformers import AutoModelForCausalLM

    class OffsetScaledWordEmbedding(torch.nn.Embedding):  # the name and attribute of a scaled one, another forward
        embed_scale = torch.tensor(2.0)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale + 1.0

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    plain = model.get_input_embeddings()
    odd = OffsetScaledWordEmbedding(plain.num_embeddings, plain.embedding_dim)
    model.set_input_embeddings(odd)
    quantize(model)
    assert model.get_input_embeddings() is odd and odd.weight.dtype == torch.float32
    assert isinstance(model.lm_head, linear_class)


# --- float16 weight-only (fbgemm) ------------------------------------------------------------


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_fp16_weight_linear_computes_with_the_rounded_weights(rows, monkeypatch):
    """float32 arithmetic on the float16-rounded weights (against float64 on the same weights: only float32's
    accumulation error is left, far below float16's rounding of the weights); a head packed in several blocks
    gives the bits of one block; the shape of a (batch, sequence, features) input is kept."""
    from llmkit.engine import fastpath

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300, bias=True)
    whole = Fp16WeightLinear(linear)
    monkeypatch.setattr(fastpath, "FP16_PACK_ROWS", 128)
    blocks = Fp16WeightLinear(linear)
    assert (len(whole.blocks), len(blocks.blocks)) == (1, 3)
    x = torch.randn(2, rows, 64)
    got = whole(x)
    assert got.shape == (2, rows, 300) and got.dtype == torch.float32
    assert torch.equal(blocks(x), got)
    weights = linear.weight.detach()
    exact = torch.nn.functional.linear(x.double(), weights.half().double(), linear.bias.detach().double())
    accumulation = (x.abs().double() @ weights.abs().double().T) * 2**-20 + 1e-6
    assert torch.all((got.double() - exact).abs() <= accumulation)
    unrounded = torch.nn.functional.linear(x.double(), weights.double(), linear.bias.detach().double())
    assert (got.double() - unrounded).abs().max() > accumulation.max()  # the weights really are float16


@needs_fbgemm
def test_quantize_fp16_leaves_a_layer_beyond_float16_in_float32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    big = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        big.weight[0, 0] = -2 * FLOAT16_MAX
    assert quantize_fp16(model) == linears - 1
    assert model.model.layers[0].mlp.down_proj is big and big.weight.dtype == torch.float32
    assert isinstance(model.model.layers[0].mlp.up_proj, Fp16WeightLinear)


@needs_fbgemm
def test_quantize_fp16_gives_a_tied_head_its_own_copy_and_scaled_embeddings_exact(tmp_path):
    """Tiny Gemma 3 (scaled embeddings, head tied to them): the embedding holds float16 and returns the original's
    rows rounded to float16, times the scale; the head is packed for fbgemm and gives the rounded weights' logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "gemma", sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    original = model.get_input_embeddings()
    weight = original.weight.detach().clone()
    ids = torch.arange(0, original.num_embeddings, 7)
    expected_rows = torch.nn.functional.embedding(ids, weight.half().float()) * original.embed_scale
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert quantize_fp16(model) == linears > 0
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CompactEmbedding) and embedding.table.dtype == torch.float16
    assert isinstance(model.lm_head, Fp16WeightLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    hidden = torch.randn(3, weight.shape[1])
    with torch.no_grad():
        assert torch.equal(embedding(ids), expected_rows)
        logits = model.lm_head(hidden).double()
    exact = hidden.double() @ weight.half().double().T
    assert torch.allclose(logits, exact, atol=1e-5, rtol=0)


def test_quantize_int8_replaces_every_linear_including_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert quantize_int8(model) == linears > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)


# --- each configuration against float32 -----------------------------------------------------


@pytest.fixture(scope="module")
def float32_reference(tiny_engine):
    result = tiny_engine.generate(PROMPT, GREEDY)
    prompt_ids = tiny_engine.prompt_ids(PROMPT)
    ids = prompt_ids + list(result.completions[0].token_ids)
    return (
        result.completions[0].token_ids,
        ids,
        len(prompt_ids),
        _logprobs(tiny_engine, ids),
        tiny_engine.info.parameters,
    )


def _logprobs(engine, ids):
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize(
    "dtype, quantize",
    [pytest.param(*key, marks=needs_fbgemm) if key[1] == "fp16" else key for key in MAX_LOGPROB_ERROR],
)
def test_configuration_matches_float32_within_tolerance(tiny_model_dir, float32_reference, dtype, quantize):
    tokens, ids, prompt_len, reference, _ = float32_reference
    assert len(tokens) == GREEDY.max_new_tokens  # a long enough sequence to compare
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype=dtype, quantize=quantize)
    assert engine.info.dtype == {"int8": "bfloat16", "bf16": "float32", "fp16": "float32"}.get(quantize, dtype)
    assert engine.info.quantize == quantize
    assert engine.info.parameters == float32_reference[4]  # counted before quantized weights become buffers

    tolerance = MAX_LOGPROB_ERROR[(dtype, quantize)]
    error = (_logprobs(engine, ids) - reference).abs().max().item()
    assert error <= tolerance
    assert error > 0  # it really ran in another precision

    top2 = reference[prompt_len - 1 : -1].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    must_agree = next((i for i, margin in enumerate(margins) if margin < 2 * tolerance), len(margins))
    got = engine.generate(PROMPT, GREEDY).completions[0].token_ids
    assert got[:must_agree] == tokens[:must_agree]


def test_float32_paths_are_identical(tiny_engine, tiny_model_dir, float32_reference):
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="float32")
    assert engine.generate(PROMPT, GREEDY).completions[0].token_ids == float32_reference[0]
    assert "oneDNN/MKL" in engine.info.choices["decode_matmul"]


def test_small_steps_switch_onednn_off_and_restore_it(tiny_model_dir):
    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert engine.info.choices["decode_matmul"].startswith("torch gemv")
    assert torch._C._get_mkldnn_enabled()
    with engine.step_context(GEMV_MAX_ROWS):
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled()
    with engine.step_context(GEMV_MAX_ROWS + 1):
        assert torch._C._get_mkldnn_enabled()


def test_choices_reach_json_and_monitor(cli, tiny_model_dir):
    record = json.loads(
        cli(
            "generate",
            "-m",
            str(tiny_model_dir),
            "--quantize",
            "int8",
            "--greedy",
            "--max-new-tokens",
            "4",
            "--json",
            PROMPT,
        ).stdout
    )
    assert record["engine"]["quantize"] == "int8" and record["engine"]["dtype"] == "bfloat16"
    assert record["engine"]["choices"]["quantize"].startswith("int8 weight-only")
    report = cli(
        "monitor",
        "-m",
        str(tiny_model_dir),
        "--quantize",
        "int8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "4",
    )
    assert report.exit_code == 0
    assert "quantize: int8 weight-only" in report.stdout and "_weight_int8pack_mm" in report.stdout
    bad = cli("generate", "-m", str(tiny_model_dir), "--quantize", "int8", "--dtype", "float16", PROMPT)
    assert bad.exit_code == 2 and "computes in bfloat16" in bad.stderr


@pytest.mark.parametrize("flag", [None, "avx512_bf16"])
def test_default_quantize_reaches_json(cli, tiny_model_dir, monkeypatch, flag):
    """No --dtype, no --quantize, no $LLMKIT_DTYPE: bfloat16 weights on a CPU without native BF16, else none;
    --quantize bf16 asks for it anywhere; with --dtype bfloat16 it is refused (exit 2)."""
    monkeypatch.delenv(devices.DTYPE_ENV)
    monkeypatch.setattr(devices, "native_bf16_flag", lambda: flag)

    def engine_record(*options: str) -> dict:
        args = ("generate", "-m", str(tiny_model_dir), "--device", "cpu", *options, "--greedy", "--max-new-tokens")
        return json.loads(cli(*args, "4", "--json", PROMPT).stdout)["engine"]

    record = engine_record()
    if flag is None:
        assert (record["quantize"], record["dtype"]) == ("bf16", "float32")
        assert record["choices"]["quantize"].startswith("bfloat16 weight-only")
        assert "no native bfloat16" in record["choices"]["quantize"]
    else:
        assert (record["quantize"], record["dtype"]) == ("none", "bfloat16")
        assert record["choices"]["quantize"] == f"none (auto: this CPU computes bfloat16 natively, flag {flag})"
    asked = engine_record("--quantize", "bf16")
    assert (asked["quantize"], asked["dtype"]) == ("bf16", "float32")
    assert "set by --quantize" in asked["choices"]["quantize"]
    assert engine_record("--dtype", "float32")["quantize"] == "none"
    bad = cli("generate", "-m", str(tiny_model_dir), "--quantize", "bf16", "--dtype", "bfloat16", PROMPT)
    assert bad.exit_code == 2 and "which --dtype bfloat16 contradicts" in bad.stderr


def test_serve_int8_and_auto_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """The server with --quantize int8 and with the real `auto` (no LLMKIT_DTYPE; at the default batch size,
    float16 weights on a CPU without native BF16 where fbgemm runs): /health names the setup, a lone greedy
    request gives the in-process engine's text for the same setup, and batched rows agree."""
    import concurrent.futures

    from tests.server_helpers import ServerProcess

    monkeypatch.delenv(devices.DTYPE_ENV)
    auto_dtype = str(devices.choose_dtype("auto", "cpu")[0]).removeprefix("torch.")
    auto_quantize = devices.choose_quantize("auto", "auto", "cpu", batch_rows=16)[0]
    for options in ({"quantize": "int8"}, {}):
        args = [f"--{name}={value}" for name, value in options.items()]
        process = ServerProcess(tiny_model_dir, tmp_path / "server.log", *args)
        process.env.pop(devices.DTYPE_ENV, None)
        with process, process.client() as client:
            health = client.get("/health").json()
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            alone = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                batched = list(
                    pool.map(lambda _, body=body: client.post("/v1/completions", json=body).json(), range(4))
                )
        assert (health["dtype"], health["quantize"]) == (
            "bfloat16" if options else auto_dtype,
            options.get("quantize", auto_quantize),
        )
        engine = load_engine(str(tiny_model_dir), LoadOptions(device="cpu", batch_rows=16, **options))
        assert alone == engine.generate(PROMPT, GenerationParams(max_new_tokens=8, temperature=0.0)).text
        assert len({answer["choices"][0]["text"] for answer in batched}) == 1


@pytest.mark.parametrize("max_batch_size", [devices.BF16_GEMV_MAX_ROWS, devices.BF16_GEMV_MAX_ROWS + 1])
def test_serve_auto_quantize_follows_the_batch_size(tiny_model_dir, tmp_path, monkeypatch, max_batch_size):
    """serve passes its --max-batch-size to --quantize auto: bfloat16 weights while every step has at most
    BF16_GEMV_MAX_ROWS rows, float16 weights above where fbgemm runs, else none (on a CPU with native BF16,
    none)."""
    from tests.server_helpers import ServerProcess

    monkeypatch.delenv(devices.DTYPE_ENV)
    expected = devices.choose_quantize("auto", "auto", "cpu", batch_rows=max_batch_size)[0]
    process = ServerProcess(tiny_model_dir, tmp_path / "server.log", f"--max-batch-size={max_batch_size}")
    process.env.pop(devices.DTYPE_ENV, None)
    with process, process.client() as client:
        health = client.get("/health").json()
    assert health["quantize"] == expected


@pytest.mark.parametrize(
    "dtype, quantize",
    [
        ("bfloat16", "none"),
        ("float16", "none"),
        ("auto", "int8"),
        ("auto", "bf16"),
        pytest.param("auto", "fp16", marks=needs_fbgemm),
    ],
)
def test_extreme_sampling_settings_run_batched_on_each_configuration(tiny_model_dir, dtype, quantize):
    """The NaN class of bug on the faster paths: every extreme setting the schema accepts, batched together
    with an ordinary request, samples real tokens and finishes; the ordinary request is unaffected."""
    from llmkit.engine.batch import BatchScheduler
    from llmkit.engine.scheduling import Finished
    from tests.server_helpers import completions, run_steps, scheduler_request

    engine = load_engine(str(tiny_model_dir), device="cpu", dtype=dtype, quantize=quantize)
    ordinary = dict(seed=4, temperature=0.9, max_new_tokens=12)
    extremes = [
        dict(top_p=1e-50),
        dict(top_p=1e-300, temperature=2.0),
        dict(min_p=1.0),
        dict(temperature=1e-30),
        dict(top_k=1, top_p=1e-50, min_p=1.0, repetition_penalty=2.0),
        dict(top_k=100_000, temperature=2.0),
        dict(repetition_penalty=0.5, min_p=1e-30),
    ]
    alone = engine.generate(PROMPT, GenerationParams(**ordinary))
    scheduler = BatchScheduler(engine)
    requests = [scheduler_request(engine, PROMPT, ordinary)]
    requests += [
        scheduler_request(engine, f"{PROMPT} {i}", dict(seed=i, max_new_tokens=6, **spec))
        for i, spec in enumerate(extremes)
    ]
    for request, _ in requests:
        scheduler.submit(request)
    run_steps(scheduler)
    for _, sink in requests:
        assert isinstance(sink.final, Finished), sink.final
        assert sink.final.result.usage.completion_tokens >= 1
    assert completions(requests[0][1].final.result) == completions(alone)
    assert scheduler.failures.requests == 0 and scheduler.failures.steps == 0
