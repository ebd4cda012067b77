"""The llmkit command line: one Typer app, one command per module, one error boundary.

`wrap_errors` is the only place where an LlmkitError becomes a red line on stderr and
an exit code (the rule is in llmkit/errors.py: 2 when the command cannot work as typed, 1 when
running it failed). Unexpected exceptions get one line too, and their traceback with --debug
(before or after the command's name) or LLMKIT_DEBUG=1; the tests set RAISE_UNEXPECTED.
A command's own exit (typer.Exit, as `compare` uses when every model failed) passes through
untouched: it is not an error of the boundary's to report.

Shell completion is Typer's (`llmkit --install-completion`), with the model aliases offered for -m
(cli/options.py); parsing.py holds the command classes (help that shows flags as flags).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from llmkit.cli import bench as bench_cmd
from llmkit.cli import cache as cache_cmd
from llmkit.cli import chat as chat_cmd
from llmkit.cli import compare as compare_cmd
from llmkit.cli import explore as explore_cmd
from llmkit.cli import generate as generate_cmd
from llmkit.cli import models as models_cmd
from llmkit.cli import monitor as monitor_cmd
from llmkit.cli import render
from llmkit.cli import serve as serve_cmd
from llmkit.cli.parsing import LlmkitTyper

DEBUG_ENV = "LLMKIT_DEBUG"
RAISE_UNEXPECTED = False  # the test suite sets this so a bug shows its traceback, not a red line

app = LlmkitTyper(
    name="llmkit",
    help="Work with language models on your own machine: generate, chat, explore, monitor, compare, serve, bench.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion, as gh, uv and Typer apps offer
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEBUG_HELP = "Show full tracebacks on errors (also LLMKIT_DEBUG=1)."
DebugOpt = Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)]


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def wrap_errors(command: Callable) -> Callable:
    """The error boundary around one command; it also gives the command a --debug option, so
    `llmkit generate ... --debug` works like `llmkit --debug generate ...` (as uv's global flags do)."""

    signature = inspect.signature(command, eval_str=True)
    own_debug = "debug" in signature.parameters

    @functools.wraps(command)
    def run(*args, debug: bool = False, **kwargs):
        from llmkit.errors import LlmkitError

        if debug:
            os.environ[DEBUG_ENV] = "1"  # as the root --debug does: compare's model subprocesses see it too
        if own_debug:
            kwargs["debug"] = debug
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # the command's own exit code (or a usage error): Typer reports it, not this boundary
        except LlmkitError as exc:
            if debugging():
                raise
            render.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            render.error("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `llmkit generate ... | head` closed the pipe: not an error
            sys.stderr.close()
            raise typer.Exit(0) from None
        except Exception as exc:
            if debugging() or RAISE_UNEXPECTED:
                raise
            from llmkit.errors import one_line

            render.error(f"unexpected {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)")
            raise typer.Exit(1) from None
        finally:
            render.messages_to_log(None)  # serve --log-format json may have sent them to its log

    if not own_debug:
        debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt)
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]  # read by Typer
            parameters=[*signature.parameters.values(), debug]
        )
        run.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()}, "debug": DebugOpt}
    return run


def version_callback(value: bool) -> None:
    if value:
        from llmkit import __version__

        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


app.command(epilog=generate_cmd.EPILOG)(wrap_errors(generate_cmd.generate))
app.command(epilog=chat_cmd.EPILOG)(wrap_errors(chat_cmd.chat))
app.add_typer(explore_cmd.build_app(wrap_errors), name="explore")
app.command(epilog=monitor_cmd.EPILOG)(wrap_errors(monitor_cmd.monitor))
app.command(epilog=compare_cmd.EPILOG)(wrap_errors(compare_cmd.compare))
app.command(epilog=serve_cmd.EPILOG)(wrap_errors(serve_cmd.serve))
app.command(epilog=bench_cmd.EPILOG)(wrap_errors(bench_cmd.bench))
app.command()(wrap_errors(models_cmd.models))
app.command(epilog=cache_cmd.EPILOG)(wrap_errors(cache_cmd.cache))


def main() -> None:
    """The `llmkit` entry point. A process that imported torch or llama.cpp ends with os._exit once its output and
    logs are flushed: the interpreter's own teardown (module by module, tensor by tensor) took 1.2-1.4 s after
    loading SmolLM2 on 2 cores, the largest part of `llmkit generate`'s overhead over loading and generating."""
    try:
        app(prog_name="llmkit")
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            exit_now(code or 0)
        raise


def exit_now(code: int) -> None:
    """End the process with `code` without the interpreter's teardown, when a heavy library is loaded (the
    commands hold no file open by then); otherwise a normal exit. The functions registered with atexit still run
    (logging's shutdown, and whatever a user's tooling registered, such as coverage: 12 ms here)."""
    if not {"torch", "llama_cpp"} & sys.modules.keys():
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or a closed stream: nothing more to say
            pass
    os._exit(code)
