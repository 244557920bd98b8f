"""`tokencap run`: start the proxy, run the agent behind it, stop the tree on a cap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tokencap import __version__, attribution, providers
from tokencap.budgets import BudgetRule, LedgerBudgets, applicable
from tokencap.caps import Budget, Refusal
from tokencap.errors import EXIT_CAPPED
from tokencap.ledger import Ledger, data_dir
from tokencap.prices import PriceOverride, Pricer, from_pico
from tokencap.proxy import Proxy, Session
from tokencap.supervisor import Child, StopResult, become_subreaper, resolve_executable

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)


@dataclass
class RunOptions:
    """Everything `tokencap run` was asked to do."""

    argv: list[str]
    db_path: Path
    task: str | None = None
    agent: str | None = None
    user: str | None = None
    team: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    max_usd: Decimal | None = None
    max_calls: int | None = None
    grace: float = 2.0
    # Cumulative budgets from the budget files; the run checks those that match its attribution.
    budget_rules: list[BudgetRule] = field(default_factory=list)
    prices: list[PriceOverride] = field(default_factory=list)
    unknown_model: str = "highest"
    # NOTE: only the HTTPS interception reads extra hosts; base-URL routing meters the three
    # providers' variables alone.
    extra_hosts: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """How a run ended."""

    session_id: str
    exit_code: int
    end_reason: str
    spent_usd: Decimal
    calls: int
    refusal: Refusal | None
    stop: StopResult | None
    unknown_models: set[tuple[str, str]]
    unreachable: dict[str, str]


def run(options: RunOptions) -> RunResult:
    """Run the agent under the caps and return how it ended."""
    env = dict(os.environ)
    upstreams = providers.upstreams_from_env(env)
    # Check the command before recording a session, so a typo leaves no trace in the ledger.
    resolve_executable(options.argv[0], env, None)
    ledger = Ledger(options.db_path)
    session_id = attribution.new_session_id()
    user = options.user or attribution.default_user()
    ledger.start_session(
        {
            "id": session_id,
            "task": options.task,
            "agent": options.agent or attribution.default_agent(options.argv),
            "user": user,
            "team": options.team,
            "tags": options.tags,
            "ci": attribution.ci_metadata(env),
            "command": options.argv,
            "cwd": os.getcwd(),
            "hostname": attribution.hostname(),
            "pid": os.getpid(),
            "max_usd": str(options.max_usd) if options.max_usd is not None else None,
            "max_calls": options.max_calls,
            "tokencap_version": __version__,
        }
    )
    budget = Budget(max_usd=options.max_usd, max_calls=options.max_calls)
    pricer = Pricer(options.prices, options.unknown_model)
    unreachable: dict[str, str] = {}
    rules = applicable(options.budget_rules, task=options.task, team=options.team, user=user)
    shared = None
    try:
        refusal = None
        if rules:
            logger.info(
                "session %s draws on %s", session_id, ", ".join(rule.label for rule in rules)
            )
            shared = LedgerBudgets(options.db_path, session_id, rules)
            # A budget that is already used up stops the run before the agent starts.
            refusal = shared.exhausted()
        if refusal is not None:
            budget.refuse(refusal)
            exit_code, stop = EXIT_CAPPED, None
        else:
            budget.shared = shared
            become_subreaper()
            exit_code, stop = asyncio.run(
                _supervise(options, env, session_id, ledger, budget, pricer, upstreams, unreachable)
            )
    except BaseException:
        ledger.end_session(session_id, status="failed", end_reason="tokencap_error")
        raise
    finally:
        if shared is not None:
            shared.close()

    if budget.tripped is not None:
        end_reason, status, exit_code = budget.tripped.cap, "capped", EXIT_CAPPED
    else:
        end_reason, status = "exited", "completed"
    spent = _recorded_spend(ledger, session_id)
    ledger.end_session(
        session_id,
        status=status,
        end_reason=end_reason,
        exit_status=exit_code,
        processes_stopped=stop.signalled if stop else 0,
    )
    ledger.close()
    return RunResult(
        session_id=session_id,
        exit_code=exit_code,
        end_reason=end_reason,
        spent_usd=spent,
        calls=budget.calls,
        refusal=budget.tripped,
        stop=stop,
        unknown_models=pricer.unknown_models,
        unreachable=unreachable,
    )


async def _supervise(
    options: RunOptions,
    env: dict[str, str],
    session_id: str,
    ledger: Ledger,
    budget: Budget,
    pricer: Pricer,
    upstreams: dict[str, providers.Upstream],
    unreachable: dict[str, str],
) -> tuple[int, StopResult | None]:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_trip(refusal: Refusal) -> None:
        # A refusal that did not come from the budget, such as an unpriced model, still ends
        # the run as capped.
        budget.refuse(refusal)
        if not stop_requested.is_set():
            logger.info("session %s stopped: %s", session_id, refusal.message)
            proxy.addon.cut_all_streams()
            stop_requested.set()

    session = Session(
        session_id, ledger, budget, pricer, upstreams, on_trip, unreachable=unreachable
    )
    with _mitmproxy_confdir() as confdir:
        proxy = Proxy(session, confdir)
        await proxy.start()
        logger.info("proxy for session %s listening on 127.0.0.1:%d", session_id, proxy.port)
        try:
            child = Child.spawn(options.argv, child_environment(env, proxy, session_id))
            stopping_tree = False

            def on_signal(sig: signal.Signals) -> None:
                # A second SIGINT or SIGTERM while the tree is being stopped skips the grace.
                if stopping_tree and sig in (signal.SIGINT, signal.SIGTERM):
                    logger.info("received %s while stopping: killing the tree now", sig.name)
                    child.kill_tree()
                else:
                    child.send_signal(sig)

            for sig in FORWARDED_SIGNALS:
                loop.add_signal_handler(sig, on_signal, sig)
            waiting = asyncio.create_task(child.wait())
            stopping = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)

            stop = None
            if stop_requested.is_set():
                stopping_tree = True
                stop = await child.stop_tree(options.grace)
            returncode = await waiting
            stopping.cancel()
            if stop is None and child.tree():
                # The agent exited but left processes behind; they would call models unmetered
                # once the proxy is gone, so they end with the run.
                logger.info("stopping %d processes the agent left behind", len(child.tree()))
                stopping_tree = True
                stop = await child.stop_tree(options.grace)
        finally:
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
            await proxy.stop()
    return _exit_code(returncode), stop


@contextlib.contextmanager
def _mitmproxy_confdir() -> Iterator[str]:
    """Yield mitmproxy's configuration directory: in the data directory, else a temporary one.

    mitmproxy writes its CA there on first start. When the data directory is not writable,
    a directory that lives only as long as the run keeps tokencap working.
    """
    confdir = data_dir() / "mitmproxy"
    try:
        confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        logger.warning("cannot create %s (%s); using a temporary directory", confdir, exc)
        with tempfile.TemporaryDirectory(prefix="tokencap-mitmproxy-") as temporary:
            yield temporary
        return
    yield str(confdir)


def child_environment(env: dict[str, str], proxy: Proxy, session_id: str) -> dict[str, str]:
    """Return the agent's environment: base URLs point at the proxy, the session id is set."""
    child = dict(env)
    for provider in providers.PROVIDERS:
        child[provider.env_var] = proxy.base_url(provider.name)
    child["TOKENCAP_SESSION_ID"] = session_id
    # A corporate proxy in HTTP(S)_PROXY must not capture the calls to tokencap itself.
    for name in ("NO_PROXY", "no_proxy"):
        entries = [e for e in child.get(name, "").split(",") if e.strip()]
        for local in ("127.0.0.1", "localhost"):
            if local not in entries:
                entries.append(local)
        child[name] = ",".join(entries)
    return child


def _exit_code(returncode: int) -> int:
    # A child killed by a signal exits as a shell reports it: 128 + the signal number.
    return 128 - returncode if returncode < 0 else returncode


def _recorded_spend(ledger: Ledger, session_id: str) -> Decimal:
    row = ledger.db.execute(
        "SELECT COALESCE(SUM(cost_pico_usd), 0) FROM calls WHERE session_id = ?", [session_id]
    ).fetchone()
    return from_pico(row[0])


def log_to_file(verbose: bool) -> Path | None:
    """Send tokencap's and mitmproxy's logs to a file; with `verbose`, to stderr as well.

    Returns the log file, or None when it cannot be written; the run goes on without it.
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    path: Path | None = data_dir() / "logs" / "tokencap.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        from tokencap.console import stderr_console

        stderr_console().print(
            f"[yellow]tokencap:[/] cannot write the log file {path}: {exc.strerror or exc}; "
            "running without it (set XDG_DATA_HOME to a writable directory)"
        )
        path = None
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
        )
        root.addHandler(handler)
    if verbose:
        from rich.logging import RichHandler

        from tokencap.console import stderr_console

        console_handler = RichHandler(console=stderr_console(), show_path=False)
        # mitmproxy's connection chatter stays in the file; its warnings still show.
        console_handler.addFilter(
            lambda record: not record.name.startswith("mitmproxy") or record.levelno >= 30
        )
        root.addHandler(console_handler)
    return path
