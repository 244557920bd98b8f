"""The `tokencap` command line. Commands parse options and hand the work to a module."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape

from tokencap import __version__
from tokencap.caps import money
from tokencap.console import stderr_console
from tokencap.errors import EXIT_INTERNAL, ConfigError, TokencapError

if TYPE_CHECKING:
    from rich.console import Console

    from tokencap.caps import Refusal
    from tokencap.report.filters import Filters
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


TaskOption = Annotated[
    str | None, typer.Option("--task", help="Task this run works on.", metavar="NAME")
]
AgentOption = Annotated[
    str | None,
    typer.Option("--agent", help="Agent name. Default: the command's base name.", metavar="NAME"),
]
UserOption = Annotated[
    str | None,
    typer.Option(
        "--user", help="User to attribute. Default: git user.email, else login.", metavar="NAME"
    ),
]
TeamOption = Annotated[
    str | None, typer.Option("--team", help="Team to attribute.", metavar="NAME")
]
TagOption = Annotated[
    list[str] | None,
    typer.Option("--tag", help="Free attribute; repeatable.", metavar="KEY=VALUE"),
]
MaxUsdOption = Annotated[
    str | None,
    typer.Option("--max-usd", help="Dollar cap for this run, such as 5 or 0.50.", metavar="USD"),
]
MaxCallsOption = Annotated[
    str | None,
    typer.Option("--max-calls", help="Maximum number of model calls sent upstream.", metavar="N"),
]
GraceOption = Annotated[
    str | None,
    typer.Option(
        "--grace",
        help="Seconds between SIGTERM and SIGKILL when stopping. Default: 2.",
        metavar="SECONDS",
    ),
]
BudgetOption = Annotated[
    Path | None,
    typer.Option(
        "--budget",
        help="Budget file to use instead of the tokencap.toml or pyproject.toml found from the "
        "working directory (also TOKENCAP_BUDGET).",
        metavar="FILE",
    ),
]
TableJsonOption = Annotated[str, typer.Option("--format", "-f", help="table or json.")]


@app.command(
    # Options end at the command's name, so the command's own options are never parsed here.
    context_settings={"allow_interspersed_args": False},
)
def run(
    command: Annotated[
        list[str], typer.Argument(help="The agent command, after --.", metavar="-- COMMAND...")
    ],
    task: TaskOption = None,
    agent: AgentOption = None,
    user: UserOption = None,
    team: TeamOption = None,
    tag: TagOption = None,
    max_usd: MaxUsdOption = None,
    max_calls: MaxCallsOption = None,
    grace: GraceOption = None,
    budget: BudgetOption = None,
    db: DbOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each call on stderr while it runs.")
    ] = False,
) -> None:
    """Run COMMAND with its model calls metered and capped.

    Settings also come from TOKENCAP_* variables and budget files such as tokencap.toml.
    Flags take precedence; `tokencap config` shows what a run would use.

    Example: tokencap run --task fix-login --max-usd 5 --max-calls 50 -- claude -p "fix it"
    """
    from tokencap import config, ledger, runner

    try:
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise ConfigError("missing the command to run; put it after --")
        flags = config.Flags(task, agent, user, team, tag or [], max_usd, max_calls, grace, budget)
        settings = config.load_settings(Path.cwd(), os.environ, flags)
        options = runner.RunOptions(
            argv=command,
            db_path=db or ledger.default_path(),
            task=settings.task.value,
            agent=settings.agent.value,
            user=settings.user.value,
            team=settings.team.value,
            tags={key: tag.value for key, tag in settings.tags.items()},
            max_usd=settings.max_usd.value,
            max_calls=settings.max_calls.value,
            grace=float(settings.grace_seconds.value),
            budget_rules=settings.budgets,
            prices=settings.prices,
            unknown_model=settings.unknown_model.value,
            intercept_hosts=tuple(settings.extra_hosts.value),
        )
        runner.log_to_file(verbose)
        result = runner.run(options)
    except TokencapError as exc:
        _fail(exc)

    print_run_result(result, verbose)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        _append_github_summary(options.db_path, result.session_id)
    raise typer.Exit(result.exit_code)


@app.command("config")
def show_config(
    task: TaskOption = None,
    agent: AgentOption = None,
    user: UserOption = None,
    team: TeamOption = None,
    tag: TagOption = None,
    max_usd: MaxUsdOption = None,
    max_calls: MaxCallsOption = None,
    grace: GraceOption = None,
    budget: BudgetOption = None,
    output_format: TableJsonOption = "table",
) -> None:
    """Show the settings a run would use and where each came from.

    Takes the settings flags of `tokencap run`:
    `tokencap config --task fix-login` shows what `tokencap run --task fix-login` would use.
    """
    from tokencap import config, config_report

    _check_format(output_format)
    try:
        flags = config.Flags(task, agent, user, team, tag or [], max_usd, max_calls, grace, budget)
        settings = config.load_settings(Path.cwd(), os.environ, flags)
    except TokencapError as exc:
        _fail(exc)
    data = config_report.describe(settings)
    if output_format == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    config_report.print_settings(_stdout_console(), data)


budget_app = typer.Typer(
    help="Check budget files and show what remains of the cumulative budgets.",
    no_args_is_help=True,
)
app.add_typer(budget_app, name="budget")


@budget_app.command("check")
def budget_check(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="Budget file to check. Default: the files a run in this directory would use.",
            metavar="[FILE]",
        ),
    ] = None,
) -> None:
    """Validate budget files without running anything; exit status 2 when one is invalid."""
    from tokencap import config

    console = stderr_console()
    try:
        files = config.discover(Path.cwd(), os.environ, file)
        if file is None:
            # Without a FILE, check the variables that a run would read as well.
            config.resolve(config.load(files), config.Flags(), os.environ)
        else:
            files = files[:1]
            config.load(files)
    except TokencapError as exc:
        _fail(exc)
    if not files:
        console.print(
            "tokencap: no budget file found: no tokencap.toml or pyproject.toml with "
            "[tool.tokencap] from here upward, and no user file; write one with `tokencap init`"
        )
        return
    for config_file in files:
        console.print(f"tokencap: {escape(str(config_file.path))} is valid")


@budget_app.command("status")
def budget_status(
    task: TaskOption = None,
    user: UserOption = None,
    team: TeamOption = None,
    budget: BudgetOption = None,
    db: DbOption = None,
    output_format: TableJsonOption = "table",
) -> None:
    """Show each cumulative budget: its limit, what was spent in its window, what remains.

    Budgets for every team or user ("*") are shown for the team and user a run here would
    have; --team and --user choose others.
    """
    from tokencap import config, config_report, ledger

    _check_format(output_format)
    try:
        flags = config.Flags(task=task, user=user, team=team, budget_file=budget)
        rows = config_report.budget_status(
            db or ledger.default_path(), Path.cwd(), os.environ, flags
        )
    except TokencapError as exc:
        _fail(exc)
    if output_format == "json":
        sys.stdout.write(json.dumps({"budgets": rows}, indent=2) + "\n")
        return
    config_report.print_budget_status(_stdout_console(), rows)


@app.command()
def init(
    path: Annotated[
        Path,
        typer.Argument(help="Where to write the file.", metavar="[PATH]"),
    ] = Path("tokencap.toml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter budget file, tokencap.toml, in the current directory."""
    from tokencap import starter

    try:
        written = starter.write(path, force=force)
    except TokencapError as exc:
        _fail(exc)
    stderr_console().print(
        f"tokencap: wrote {escape(str(written))}; edit it, then check it with "
        "`tokencap budget check`"
    )


class OutputFormat(StrEnum):
    """Output formats of report and sessions."""

    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


class SortOrder(StrEnum):
    """Orders of a grouped report."""

    cost = "cost"
    calls = "calls"
    sessions = "sessions"
    name = "name"


FormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        help="table (plain text when piped), json, csv or markdown.",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only calls from this time on: 2026-12-01, 2026-12-01T09:30 (UTC), today, "
        "or an age such as 30m, 24h, 7d.",
        metavar="WHEN",
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        help="Only calls before this time; a date includes its whole day (UTC).",
        metavar="WHEN",
    ),
]
TaskFilter = Annotated[
    list[str] | None,
    typer.Option("--task", help="Only this task; repeatable; * and ? match any.", metavar="NAME"),
]
AgentFilter = Annotated[
    list[str] | None, typer.Option("--agent", help="Only this agent; repeatable.", metavar="NAME")
]
UserFilter = Annotated[
    list[str] | None, typer.Option("--user", help="Only this user; repeatable.", metavar="NAME")
]
TeamFilter = Annotated[
    list[str] | None, typer.Option("--team", help="Only this team; repeatable.", metavar="NAME")
]
TagFilter = Annotated[
    list[str] | None,
    typer.Option("--tag", help="Only sessions with this tag; repeatable.", metavar="KEY=VALUE"),
]
SessionFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--session",
        help="Only this session (an id, or its unique start or end); repeatable.",
        metavar="ID",
    ),
]
StatusFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--status",
        help="Only sessions in this state: completed, capped, failed, running or stale.",
        metavar="STATUS",
    ),
]
ModelFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--model", help="Only calls to this model; repeatable; * matches any.", metavar="NAME"
    ),
]
ProviderFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--provider",
        help="Only calls to this provider, such as anthropic, openai or gemini; repeatable.",
        metavar="NAME",
    ),
]


@app.command()
def report(
    by: Annotated[
        list[str] | None,
        typer.Option(
            help="Group by task, session, agent, user, team, model, provider, day or tag:KEY; "
            "several with commas, such as team,task. Default: task.",
            metavar="KEYS",
        ),
    ] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    task: TaskFilter = None,
    agent: AgentFilter = None,
    user: UserFilter = None,
    team: TeamFilter = None,
    tag: TagFilter = None,
    session: SessionFilter = None,
    status: StatusFilter = None,
    model: ModelFilter = None,
    provider: ProviderFilter = None,
    sort: Annotated[
        SortOrder | None,
        typer.Option(help="Order of groups. Default: cost, or name when grouped by day."),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            min=1, help="Show only the first N groups; the total covers all.", metavar="N"
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(min=0, help="Sessions in the JSON `sessions` list; 0 lists all.", metavar="N"),
    ] = 50,
    output_format: FormatOption = OutputFormat.table,
    db: DbOption = None,
) -> None:
    """Show spend per task, or grouped --by other keys, with a totals row.

    With --session ID alone: that session's caps, calls, prompt fan-out and spend chart.

    Example: tokencap report --since 7d --by team,task
    """
    from tokencap import ledger
    from tokencap.report import filters as report_filters
    from tokencap.report import output

    path = db or ledger.default_path()
    session_ids = [part.strip() for value in session or [] for part in value.split(",")]
    try:
        if len(session_ids) == 1 and not by:
            _check_detail_options(
                since, until, task, agent, user, team, tag, status, model, provider, sort, top
            )
            output.print_detail(path, session_ids[0], output_format)
            return
        filters = _filters(
            since, until, task, agent, user, team, tag, session, status, model, provider
        )
        group_by = report_filters.parse_group_by(by or ["task"])
        output.print_grouped(
            path,
            group_by,
            filters,
            output_format,
            sort=sort,
            top=top,
            limit=limit or None,
        )
        if output_format == "table" and path.exists():
            _print_remaining_budgets(path)
    except TokencapError as exc:
        stderr_console().print(f"[bold red]tokencap:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None


def _filters(
    since: str | None,
    until: str | None,
    task: list[str] | None,
    agent: list[str] | None,
    user: list[str] | None,
    team: list[str] | None,
    tag: list[str] | None,
    session: list[str] | None,
    status: list[str] | None,
    model: list[str] | None,
    provider: list[str] | None,
) -> Filters:
    from tokencap.report.filters import build_filters

    return build_filters(
        since=since,
        until=until,
        tasks=task,
        agents=agent,
        users=user,
        teams=team,
        tags=tag,
        sessions=session,
        statuses=status,
        models=model,
        providers=provider,
    )


def _print_remaining_budgets(db_path: Path) -> None:
    """Print what remains of the cumulative budgets that apply here, if any are set."""
    from tokencap import config_report

    try:
        rows = config_report.budget_status(db_path, Path.cwd(), os.environ)
    except TokencapError as exc:
        # A broken budget file must not hide the spend report itself.
        stderr_console().print(f"[yellow]tokencap:[/] remaining budgets not shown: {exc}")
        return
    if rows:
        config_report.print_budget_status(_stdout_console(), rows)


def _check_detail_options(*values: object) -> None:
    if any(value for value in values):
        raise ConfigError(
            "--session ID on its own shows that session in detail, which takes no other "
            "filter, --sort or --top; add --by to report on it with them"
        )


@app.command()
def sessions(
    since: SinceOption = None,
    until: UntilOption = None,
    task: TaskFilter = None,
    agent: AgentFilter = None,
    user: UserFilter = None,
    team: TeamFilter = None,
    tag: TagFilter = None,
    session: SessionFilter = None,
    status: StatusFilter = None,
    model: ModelFilter = None,
    provider: ProviderFilter = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Number of sessions to list; 0 lists all.", metavar="N")
    ] = 20,
    output_format: FormatOption = OutputFormat.table,
    db: DbOption = None,
) -> None:
    """List recent sessions, newest first, with their state, calls and cost against caps.

    A session is stale when it is recorded as running but its tokencap process is gone.
    """
    from tokencap import ledger
    from tokencap.report import output

    try:
        filters = _filters(
            since, until, task, agent, user, team, tag, session, status, model, provider
        )
        output.print_sessions(db or ledger.default_path(), filters, output_format, limit or None)
    except TokencapError as exc:
        stderr_console().print(f"[bold red]tokencap:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None


@app.command()
def watch(
    task: TaskFilter = None,
    agent: AgentFilter = None,
    user: UserFilter = None,
    team: TeamFilter = None,
    tag: TagFilter = None,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between refreshes.", metavar="SECONDS")
    ] = 1.0,
    iterations: Annotated[
        int,
        typer.Option(min=0, help="Stop after N refreshes; 0 runs until Ctrl-C.", metavar="N"),
    ] = 0,
    ended_within: Annotated[
        float,
        typer.Option(
            min=0,
            help="Keep showing sessions that ended within this many seconds.",
            metavar="SECONDS",
        ),
    ] = 60.0,
    db: DbOption = None,
) -> None:
    """Show running sessions live: spend and calls against their caps, and the last model.

    Run it in another terminal while agents run under `tokencap run`.
    """
    from tokencap import ledger
    from tokencap.report import filters as report_filters
    from tokencap.report import output
    from tokencap.report.watch import watch as watch_ledger

    try:
        filters = report_filters.build_filters(
            tasks=task, agents=agent, users=user, teams=team, tags=tag
        )
        watch_ledger(
            db or ledger.default_path(),
            filters,
            output.stdout_console(),
            interval=interval,
            iterations=iterations,
            ended_within=ended_within,
        )
    except TokencapError as exc:
        stderr_console().print(f"[bold red]tokencap:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


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
    from tokencap.config import parse_usd

    try:
        code = demo_module.run_demo(db, parse_usd(max_usd))
    except TokencapError as exc:
        _fail(exc)
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
    from rich.table import Table

    from tokencap import agents as agents_module

    _check_format(output_format)
    profiles = agents_module.listing()
    if output_format == "json":
        sys.stdout.write(json.dumps({"profiles": profiles}, indent=2) + "\n")
        return
    table = Table("profile", "commands", "base URLs set", "refusal", "summary")
    for profile in profiles:
        table.add_row(
            profile["name"],
            ", ".join(profile["commands"]) or "(any other)",
            ", ".join(profile["base_url_variables"]) or "(none)",
            profile["refusal"],
            profile["summary"],
        )
    _stdout_console().print(table)


def print_run_result(result: RunResult, verbose: bool = False) -> None:
    """Print the end of a run on stderr: the cap line, unknown prices, or with verbose a summary."""
    console = stderr_console()
    for provider, model in sorted(result.unknown_models):
        console.print(
            f"[yellow]tokencap:[/] no price is known for {provider} model {escape(repr(model))}; "
            f"its calls were charged at the highest {provider} rates and flagged as estimated. "
            f"To price it, add {escape(_price_table(model))} with input_per_mtok and "
            "output_per_mtok to tokencap.toml"
        )
    for upstream, error in sorted(result.unreachable.items()):
        console.print(
            f"[yellow]tokencap:[/] calls could not reach {upstream}: {error}; check the "
            "base-URL variable tokencap was started with"
        )
    if result.unmetered:
        console.print(
            "[yellow]tokencap:[/] model-API traffic reached upstream without being metered; "
            + escape(
                "add its hosts to extra_hosts in the [proxy] table of tokencap.toml if it "
                "should count:"
            )
        )
        for line in result.unmetered:
            console.print(f"  {line}")
    if result.refusal is not None:
        stopped = result.stop.signalled if result.stop else 0
        console.print(
            f"[bold red]tokencap:[/] stopped by {escape(_stop_reason(result.refusal))}; "
            f"{_count(result.calls, 'call')} sent, "
            f"{_count(stopped, 'process', 'processes')} stopped (session {result.session_id})"
        )
    elif verbose:
        console.print(
            f"tokencap: session {result.session_id} ended: ${money(result.spent_usd)} spent, "
            f"{_count(result.calls, 'call')}, exit status {result.exit_code}"
        )


def _append_github_summary(db_path: Path, session_id: str) -> None:
    from tokencap.report.github import write_github_summary

    summary = Path(os.environ["GITHUB_STEP_SUMMARY"])
    try:
        write_github_summary(db_path, session_id, summary)
    except Exception as exc:
        # The run is over and its exit status must reach CI unchanged, whatever went wrong here.
        logging.getLogger(__name__).exception("cannot append the GitHub job summary")
        stderr_console().print(
            f"[yellow]tokencap:[/] cannot append the session summary to GITHUB_STEP_SUMMARY "
            f"({summary}): {exc}"
        )


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _stop_reason(refusal: Refusal) -> str:
    # A shared budget's message starts with its name, such as "team budget platform/day: ...".
    if refusal.label is not None:
        return refusal.message
    return f"{refusal.cap}: {refusal.message}"


def _price_table(model: str) -> str:
    return f'[prices.models."{model}"]'


def _fail(exc: TokencapError) -> NoReturn:
    """Print a tokencap error on stderr and exit with its status."""
    stderr_console().print(f"[bold red]tokencap:[/] {escape(str(exc))}")
    raise typer.Exit(exc.exit_code) from None


def _check_format(output_format: str) -> None:
    if output_format not in ("table", "json"):
        _fail(ConfigError(f"invalid --format {output_format!r}: use table or json"))


def _stdout_console() -> Console:
    from rich.console import Console

    # A pipe has no width; rich would assume 80 columns and shorten every value.
    return Console(width=None if sys.stdout.isatty() else 200)


def main() -> None:
    """Run the command line."""
    app()
