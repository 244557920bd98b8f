"""The `tokencap` command line. Commands parse options and hand the work to a module."""

from __future__ import annotations

import math
import sys
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tokencap import __version__
from tokencap.caps import money
from tokencap.console import stderr_console
from tokencap.errors import EXIT_INTERNAL, EXIT_USAGE, ConfigError, TokencapError

if TYPE_CHECKING:
    from tokencap.runner import RunResult

app = typer.Typer(
    help="Run an AI agent under a hard budget: every model call metered, the agent stopped "
    "before the call that would exceed the cap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        envvar="TOKENCAP_DB",
        help="SQLite ledger file. Default: tokencap.db in the XDG data directory.",
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"tokencap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Meter and cap AI agent runs."""


@app.command(
    # Options end at the command's name, so the command's own options are never parsed here.
    context_settings={"allow_interspersed_args": False},
)
def run(
    command: Annotated[
        list[str], typer.Argument(help="The agent command, after --.", metavar="-- COMMAND...")
    ],
    task: Annotated[
        str | None, typer.Option(help="Task this run works on.", metavar="NAME")
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option(help="Agent name. Default: the command's base name.", metavar="NAME"),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            help="User to attribute. Default: git user.email, else login.", metavar="NAME"
        ),
    ] = None,
    team: Annotated[str | None, typer.Option(help="Team to attribute.", metavar="NAME")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="Free attribute; repeatable.", metavar="KEY=VALUE")
    ] = None,
    max_usd: Annotated[
        str | None, typer.Option(help="Dollar cap for this run, such as 5 or 0.50.", metavar="USD")
    ] = None,
    max_calls: Annotated[
        str | None, typer.Option(help="Maximum number of model calls sent upstream.", metavar="N")
    ] = None,
    grace: Annotated[
        str,
        typer.Option(
            help="Seconds between SIGTERM and SIGKILL when stopping (default 2).",
            metavar="SECONDS",
            show_default=False,
        ),
    ] = "2",
    db: DbOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each call on stderr while it runs.")
    ] = False,
) -> None:
    """Run COMMAND with its model calls metered and capped.

    Example: tokencap run --task fix-login --max-usd 5 --max-calls 50 -- claude -p "fix it"
    """
    from tokencap import attribution, ledger, runner

    console = stderr_console()
    try:
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise ConfigError("missing the command to run; put it after --")
        options = runner.RunOptions(
            argv=command,
            db_path=db or ledger.default_path(),
            task=task,
            agent=agent,
            user=user,
            team=team,
            tags=attribution.parse_tags(tag or []),
            max_usd=_parse_usd(max_usd),
            max_calls=_parse_max_calls(max_calls),
            grace=_parse_grace(grace),
        )
        runner.log_to_file(verbose)
        result = runner.run(options)
    except TokencapError as exc:
        console.print(f"[bold red]tokencap:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None

    print_run_result(result, verbose)
    raise typer.Exit(result.exit_code)


@app.command()
def report(
    db: DbOption = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    limit: Annotated[int, typer.Option(min=1, help="Number of sessions to show.")] = 50,
) -> None:
    """Show recorded sessions, newest first, with their calls, tokens and cost."""
    from tokencap import ledger
    from tokencap import report as report_module

    console = stderr_console()
    if output_format not in ("table", "json"):
        console.print(
            f"[bold red]tokencap:[/] invalid --format {output_format!r}: use table or json"
        )
        raise typer.Exit(EXIT_USAGE)
    path = db or ledger.default_path()
    if not path.exists():
        rows = []
    else:
        try:
            book = ledger.Ledger(path)
            rows = report_module.sessions(book, limit)
            book.close()
        except TokencapError as exc:
            console.print(f"[bold red]tokencap:[/] {exc}")
            raise typer.Exit(exc.exit_code) from None
    if output_format == "json":
        sys.stdout.write(report_module.to_json(rows) + "\n")
        return
    from rich.console import Console

    # A pipe has no width; rich would assume 80 columns and shorten every value.
    width = None if sys.stdout.isatty() else 200
    report_module.print_report(Console(width=width), rows)


@app.command()
def demo(
    db: DbOption = None,
    max_usd: Annotated[
        str, typer.Option(help="Dollar cap for the demo run.", metavar="USD")
    ] = "0.05",
) -> None:
    """Run a small example agent against a built-in simulated provider, under a cap.

    Needs no API key and no network: the simulated provider runs on 127.0.0.1.
    """
    from tokencap import demo as demo_module

    try:
        code = demo_module.run_demo(db, _parse_usd(max_usd))
    except TokencapError as exc:
        stderr_console().print(f"[bold red]tokencap:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


@app.command()
def simulate(
    port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="TCP port on 127.0.0.1 to listen on; 0 picks a free port."
        ),
    ] = 7086,
) -> None:
    """Run a simulated model provider on 127.0.0.1 until Ctrl-C.

    It responds to Anthropic, OpenAI and Gemini API calls with canned replies and realistic usage,
    so agents and SDKs can be tried under tokencap without an API key or network.
    """
    import shlex
    import threading

    from tokencap.simulator import SimulatedCall, SimulatedProvider

    console = stderr_console()

    def show_call(call: SimulatedCall) -> None:
        mode = "stream" if call.streamed else "json"
        console.print(
            f"{call.api} {call.model or '?'} ({mode}): HTTP {call.status}, "
            f"{call.input_tokens} input and {call.output_tokens} output tokens"
        )

    simulator = SimulatedProvider(port, on_call=show_call)
    try:
        simulator.start()
    except OSError as exc:
        console.print(
            f"[bold red]tokencap:[/] cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}; "
            "choose another --port, or --port 0 for a free one"
        )
        raise typer.Exit(EXIT_INTERNAL) from None

    # The demo agent is part of tokencap, so it runs with tokencap's own interpreter.
    python = shlex.quote(sys.executable)
    with simulator:
        console.print(f"[bold]Simulated model provider listening on {simulator.url}[/]")
        console.print("Point agents at it from another shell:")
        for name, value in simulator.environment().items():
            console.print(f"  export {name}={value}")
        console.print(
            "It accepts any API key. SDKs that insist on one can use a dummy:\n"
            "  export ANTHROPIC_API_KEY=test OPENAI_API_KEY=test GEMINI_API_KEY=test\n"
            "Then run an agent under tokencap, such as:\n"
            f"  tokencap run --max-calls 3 -- {python} -m tokencap.demo_agent\n"
            "Press Ctrl-C to stop."
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            console.print(f"Simulated provider stopped after {simulator.inference_requests} calls.")


@app.command()
def agents(
    output_format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
) -> None:
    """List the agent profiles: how tokencap meters each known agent without changing it.

    The profile is picked from the command's name; any other command gets the generic one.
    """
    from tokencap import agents as agents_module

    if output_format not in ("table", "json"):
        stderr_console().print(
            f"[bold red]tokencap:[/] invalid --format {output_format!r}: use table or json"
        )
        raise typer.Exit(EXIT_USAGE)
    profiles = agents_module.listing()
    if output_format == "json":
        import json

        sys.stdout.write(json.dumps({"profiles": profiles}, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    width = None if sys.stdout.isatty() else 200
    table = Table("profile", "commands", "base URLs set", "refusal", "summary")
    for profile in profiles:
        table.add_row(
            profile["name"],
            ", ".join(profile["commands"]) or "(any other)",
            ", ".join(profile["base_url_variables"]) or "(none)",
            profile["refusal"],
            profile["summary"],
        )
    Console(width=width).print(table)


def print_run_result(result: RunResult, verbose: bool = False) -> None:
    """Print the end of a run on stderr: the cap line, unknown prices, or with verbose a summary."""
    console = stderr_console()
    for provider, model in sorted(result.unknown_models):
        console.print(
            f"[yellow]tokencap:[/] no price is known for {provider} model {model!r}; its calls "
            f"were charged at the highest {provider} rates and flagged as estimated"
        )
    for upstream, error in sorted(result.unreachable.items()):
        console.print(
            f"[yellow]tokencap:[/] calls could not reach {upstream}: {error}; check the "
            "base-URL variable tokencap was started with"
        )
    if result.unmetered:
        console.print(
            "[yellow]tokencap:[/] model-API traffic reached upstream without being metered; "
            "add its hosts to the intercepted hosts if it should count:"
        )
        for line in result.unmetered:
            console.print(f"  {line}")
    if result.refusal is not None:
        stopped = result.stop.signalled if result.stop else 0
        console.print(
            f"[bold red]tokencap:[/] stopped by {result.refusal.cap}: {result.refusal.message}; "
            f"{_count(result.calls, 'call')} sent, "
            f"{_count(stopped, 'process', 'processes')} stopped (session {result.session_id})"
        )
    elif verbose:
        console.print(
            f"tokencap: session {result.session_id} ended: ${money(result.spent_usd)} spent, "
            f"{_count(result.calls, 'call')}, exit status {result.exit_code}"
        )


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _parse_usd(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = Decimal(value.strip().lstrip("$"))
    except InvalidOperation:
        raise ConfigError(
            f"invalid --max-usd {value!r}: expected dollars, such as 5 or 0.50"
        ) from None
    if not amount.is_finite():
        raise ConfigError(f"invalid --max-usd {value!r}: expected a finite amount, such as 5")
    if amount <= 0:
        raise ConfigError(f"invalid --max-usd {value!r}: the cap must be more than 0")
    if amount != amount.quantize(Decimal("1e-12"), rounding=ROUND_DOWN):
        raise ConfigError(
            f"invalid --max-usd {value!r}: tokencap counts in picodollars, 12 decimal places"
        )
    # Store and print the cap in plain notation: 1E+3 becomes 1000.
    return Decimal(format(amount.normalize(), "f"))


def _parse_max_calls(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        calls = int(value.strip())
    except ValueError:
        raise ConfigError(
            f"invalid --max-calls {value!r}: expected a whole number, such as 50"
        ) from None
    if calls < 1:
        raise ConfigError(f"invalid --max-calls {value!r}: it must be at least 1")
    return calls


# A grace period longer than this would leave a stopped agent running for too long to be a cap.
MAX_GRACE_SECONDS = 300


def _parse_grace(value: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        raise ConfigError(
            f"invalid --grace {value!r}: expected seconds, such as 2 or 0.5"
        ) from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_GRACE_SECONDS:
        raise ConfigError(
            f"invalid --grace {value!r}: expected seconds from 0 to {MAX_GRACE_SECONDS}"
        )
    return seconds


def main() -> None:
    """Run the command line."""
    app()
