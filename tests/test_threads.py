"""--threads / LLMKIT_THREADS on every command that runs a model, and the busy-machine rule (measure.py).

torch's thread count belongs to the process, so the tests that set it run llmkit in a subprocess, or
put the count back afterwards (the keep_torch_threads fixture). Busy readings are injected (a fake
os.getloadavg / psutil.cpu_times, in-process or through a sitecustomize module in the subprocesses);
nothing here waits for real load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch

from llmkit.measure import LOAD_MARGIN, STEAL_BUSY_PERCENT, LoadWatch, judge_load, steal_percent

PROMPT = "Once upon a time"
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice in this process, read before any test sets it
OTHER = 1 if DEFAULT_THREADS != 1 else 2  # a count that differs from the default, so a test can tell it was set
REPORT_AT_EXIT = """
import atexit, sys

def _report():
    torch = sys.modules.get("torch")
    if torch is not None:
        sys.stderr.write(f"torch-threads-at-exit {torch.get_num_threads()}\\n")

atexit.register(_report)
"""
HEAVY_LOAD = "import os\nos.getloadavg = lambda: (50.0, 50.0, 50.0)\n"


@pytest.fixture()
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def child_env(tmp_path: Path, site_code: str) -> dict[str, str]:
    """The environment of a python child that runs `site_code` first (as its sitecustomize module)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(site_code)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "LLMKIT_NO_PROGRESS": "1", "PYTHONPATH": path}


CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


def cpu(user=0.0, idle=0.0, steal=0.0, guest=0.0) -> CpuTimes:
    return CpuTimes(user, 0.0, 0.0, idle, 0.0, 0.0, 0.0, steal, guest, 0.0)


# --- the option, through the CLI ------------------------------------------------------------------------------


def test_llmkit_threads_env_and_the_flag_beats_it(cli, tiny_model_dir, monkeypatch, keep_torch_threads):
    monkeypatch.setenv("LLMKIT_THREADS", str(OTHER))
    base = ["generate", "-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "3", "--json", PROMPT]
    engine = json.loads(cli(*base).stdout)["engine"]
    assert engine["threads"] == OTHER == torch.get_num_threads()
    assert engine["choices"]["threads"] == f"{OTHER} (LLMKIT_THREADS={OTHER})"
    flag = json.loads(cli(*base, "--threads", "3").stdout)["engine"]
    assert flag["threads"] == 3 == torch.get_num_threads() and flag["choices"]["threads"] == "3 (set by --threads)"


def test_default_is_torch_own_count(cli, tiny_model_dir, monkeypatch, keep_torch_threads):
    monkeypatch.delenv("LLMKIT_THREADS", raising=False)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(DEFAULT_THREADS)
    engine = json.loads(
        cli("generate", "-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "2", "--json", PROMPT).stdout
    )["engine"]
    assert engine["threads"] == DEFAULT_THREADS
    assert engine["choices"]["threads"] == f"{DEFAULT_THREADS} (torch's default: one per physical core)"


COMMANDS = {
    "generate": ["generate", PROMPT],
    "explore": ["explore", PROMPT],
    "next-token": ["explore", "next-token", PROMPT],
    "monitor": ["monitor"],
    "compare": ["compare", "some-model"],
    "serve": ["serve"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_threads_exit_2_before_loading(cli, tmp_path, monkeypatch, command):
    model = ["-m", str(tmp_path / "would-fail-to-load.gguf")] if command != "compare" else []
    zero = cli(*COMMANDS[command], *model, "--threads", "0")
    assert zero.exit_code == 2 and "--threads must be between 1 and 1024 (got 0)" in zero.stderr
    monkeypatch.setenv("LLMKIT_THREADS", "many")
    env = cli(*COMMANDS[command], *model)
    assert env.exit_code == 2 and "LLMKIT_THREADS must be a whole number of threads, e.g. 1 (got 'many')" in env.stderr
    assert len(env.stderr.strip().splitlines()) == 1


def test_a_bad_thread_count_does_not_import_torch():
    probe = (
        "import os, sys\nfrom llmkit.cli import app\n"
        "for argv in (['generate', '--threads', '0', 'x'], ['serve', '--threads', '-1']):\n"
        "    try:\n        app(argv, prog_name='llmkit')\n    except SystemExit as exit:\n"
        "        print('exit', exit.code)\n"
        "print('TORCH' if 'torch' in sys.modules or 'transformers' in sys.modules else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["exit", "2", "exit", "2", "LIGHT"], out.stderr


def test_help_says_what_to_do_on_a_busy_machine(cli):
    text = cli("generate", "--help").stdout
    assert "--threads" in text and "LLMKIT_THREADS" in text and "busy" in text


# --- both engines ---------------------------------------------------------------------------------------------


def test_llama_cpp_gets_the_count_for_decode_and_prompt_batches(tmp_path, keep_torch_threads):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import llama_cpp

    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    asked = load_engine(str(gguf), engine="llama.cpp", threads=3)
    context = asked.llm._ctx.ctx
    assert llama_cpp.llama_n_threads(context) == 3 and llama_cpp.llama_n_threads_batch(context) == 3
    assert asked.info.threads == 3 and asked.info.setup()["threads"] == 3
    assert asked.info.choices["threads"] == "3 (set by --threads); prompt batches 3"
    assert torch.get_num_threads() == 3  # llmkit samples with torch: the same count

    torch.set_num_threads(DEFAULT_THREADS)
    default = load_engine(str(gguf), engine="llama.cpp")  # today's behaviour: torch's count, llama.cpp's batch
    assert llama_cpp.llama_n_threads(default.llm._ctx.ctx) == DEFAULT_THREADS == default.info.threads
    assert default.llm.n_threads_batch == os.cpu_count()


def test_compare_passes_threads_to_its_workers_and_warns_when_busy(cli, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", child_env(tmp_path, HEAVY_LOAD)["PYTHONPATH"])  # the workers see load 50
    result = cli(
        "compare",
        str(tiny_model_dir),
        "--threads",
        str(OTHER),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "3",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    row = document["rows"][0]
    assert row["ok"] and document["spec"]["threads"] == OTHER
    assert row["threads"] == row["engine"]["threads"] == OTHER and row["worker_pid"] != os.getpid()
    assert row["engine"]["choices"]["threads"] == f"{OTHER} (set by --threads)"
    load = row["machine_load"]
    assert load["busy"] and load["load_average"] == 50.0 and load["threads"] == OTHER
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"busy during the runs of {tiny_model_dir}" in warnings[0]
    assert "load average 50.0" in warnings[0] and "not comparable" in warnings[0]


def test_compare_table_names_the_threads():
    from llmkit.compare import busy_measurement, threads_text

    rows = [
        {"model": "a", "ok": True, "threads": 2},
        {"model": "b", "ok": True, "threads": 2},
        {"model": "c", "ok": False},
    ]
    assert threads_text(rows) == "threads: 2 per model"
    rows[1]["threads"] = 1
    assert threads_text(rows) == "threads: a 2, b 1"
    assert busy_measurement(rows) is None


# --- monitor; generate and serve as real processes -----------------------------------------------------------


def fake_readings(monkeypatch, load: float) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(psutil, "cpu_times", lambda: cpu(user=100.0))  # no time passes: steal unknown


def test_monitor_reports_threads_and_warns_on_a_busy_machine(cli, tiny_model_dir, monkeypatch, keep_torch_threads):
    args = ["monitor", "-m", str(tiny_model_dir), "--runs", "1", "--warmup", "0", "--max-new-tokens", "3"]
    fake_readings(monkeypatch, 40.0)
    busy = cli(*args, "--threads", str(OTHER), "--json")
    assert busy.exit_code == 0, busy.stderr
    report = json.loads(busy.stdout)
    assert report["model"]["threads"] == OTHER and report["environment"]["torch_threads"] == OTHER
    assert report["machine_load"]["busy"] and report["machine_load"]["load_average"] == 40.0
    warnings = [line for line in busy.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "busy during the measurement" in warnings[0]

    fake_readings(monkeypatch, 0.0)
    quiet = cli(*args, "--threads", "3")
    assert quiet.exit_code == 0, quiet.stderr
    assert "warning" not in quiet.stderr
    assert "· 3 threads ·" in quiet.stdout and "threads: 3 (set by --threads)" in quiet.stdout


def test_real_generate_computes_with_the_threads_and_says_so(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            "-m",
            str(tiny_model_dir),
            "--threads",
            str(OTHER),
            "--greedy",
            "--max-new-tokens",
            "4",
            "--json",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(tmp_path, REPORT_AT_EXIT),
    )
    assert out.returncode == 0, out.stderr
    engine = json.loads(out.stdout)["engine"]
    assert engine["threads"] == OTHER and engine["choices"]["threads"] == f"{OTHER} (set by --threads)"
    assert f"tok/s decode · {OTHER} thread" in out.stderr  # the timing line names the count behind the speed
    assert f"torch-threads-at-exit {OTHER}" in out.stderr  # torch itself computed with it


def test_real_serve_loads_with_the_threads_and_says_so(tiny_model_dir, tmp_path):
    from tests.server_helpers import ServerProcess

    with ServerProcess(tiny_model_dir, tmp_path / "serve.log", "--threads", str(OTHER)) as server:
        with server.client() as http:
            health = http.get("/health").json()
    assert health["threads"] == OTHER
    log = server.log()  # read once the server stopped, so every line is written
    assert f"threads {OTHER} ·" in log and f"threads {OTHER}), loaded in" in log  # the banner, the ready line


# --- the busy rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "threads", "load", "busy"),
    [
        (2, 2, 9.0, True),  # the machine: 2.4-2.8 tok/s instead of 17-19
        (2, 1, 9.0, True),  # one thread is faster there, and still not comparable with a quiet run
        (2, 2, 2.4, False),  # the measurement's own 2 threads (and a little noise) are not "busy"
        (2, 2, 2 + LOAD_MARGIN, False),
        (2, 2, 2 + LOAD_MARGIN + 0.01, True),
        (16, 4, 15.0, False),  # others ask for 11 of the 12 cores left free
        (16, 4, 17.0, True),
        (2, 8, 8.0, False),  # more threads than cores: the measurement overloads the machine itself
        (2, 2, None, False),  # no load average on this system
    ],
)
def test_busy_rule_on_the_load_average(cores, threads, load, busy):
    judged = judge_load(cores=cores, threads=threads, load_average=load, steal_percent=None)
    assert judged.busy is busy
    assert judged.free_cores == max(0, cores - threads)
    if load is not None:
        assert judged.others_load == max(0.0, load - threads)
        assert (f"load average {load:.1f} on {cores} cores" in judged.reason) is busy


def test_busy_rule_on_steal():
    over = judge_load(cores=2, threads=2, load_average=0.5, steal_percent=STEAL_BUSY_PERCENT + 1)
    assert over.busy and "(steal)" in over.reason and "load average" not in over.reason
    assert not judge_load(cores=2, threads=2, load_average=0.5, steal_percent=STEAL_BUSY_PERCENT).busy
    both = judge_load(cores=2, threads=1, load_average=9.0, steal_percent=30.0)
    assert both.reason.count(";") == 1 and "--threads 1" not in both.warning()
    assert "--threads 1" in judge_load(cores=2, threads=2, load_average=9.0, steal_percent=None).warning()


def test_steal_percent_between_two_readings():
    assert steal_percent(cpu(user=10, idle=10), cpu(user=19, idle=10, steal=1)) == pytest.approx(10.0)
    # guest time is already inside user time: not counted twice
    assert steal_percent(cpu(), cpu(user=8, steal=2, guest=8)) == pytest.approx(20.0)
    assert steal_percent(cpu(), cpu(user=0.5, steal=0.1)) is None  # 0.6 CPU-seconds: too short to tell
    NoSteal = namedtuple("NoSteal", "user system idle")
    assert steal_percent(NoSteal(0, 0, 0), NoSteal(5, 0, 5)) is None  # macOS and others have no counter


def test_load_watch_takes_the_higher_reading_and_the_steal_in_between(monkeypatch):
    loads = iter([(1.0, 0, 0), (6.0, 0, 0)])
    times = iter([cpu(user=100, idle=100), cpu(user=140, idle=150, steal=10)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    monkeypatch.setattr(psutil, "cpu_times", lambda: next(times))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    judged = LoadWatch().stop(threads=None)  # threads unknown: taken as all the cores
    assert judged.load_average == 6.0 and judged.cores == judged.threads == 4
    assert judged.steal_percent == pytest.approx(10.0) and judged.busy
    assert (
        judged.reason == "load average 6.0 on 4 cores while this measurement computed with 4 threads; "
        "the hypervisor took 10% of the CPU time (steal)"
    )
