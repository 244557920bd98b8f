"""`tokencap run`: start the proxy, run the agent behind it, stop the tree on a cap."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
                _supervise(options, env, session_id, ledger, budget, pricer, upstreams)
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
    )


async def _supervise(
    options: RunOptions,
    env: dict[str, str],
    session_id: str,
    ledger: Ledger,
    budget: Budget,
    pricer: Pricer,
    upstreams: dict[str, providers.Upstream],
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

    session = Session(session_id, ledger, budget, pricer, upstreams, on_trip)
    confdir = data_dir() / "mitmproxy"
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    proxy = Proxy(session, str(confdir))
    await proxy.start()
    logger.info("proxy for session %s listening on 127.0.0.1:%d", session_id, proxy.port)

    try:
        child = Child.spawn(options.argv, child_environment(env, proxy, session_id))
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, child.send_signal, sig)
        waiting = asyncio.create_task(child.wait())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)

        stop = None
        if stop_requested.is_set():
            stop = await child.stop_tree(options.grace)
        returncode = await waiting
        stopping.cancel()
        if stop is None and child.tree():
            # The agent exited but left processes behind; they would call models unmetered
            # once the proxy is gone, so they end with the run.
            logger.info("stopping %d processes the agent left behind", len(child.tree()))
            stop = await child.stop_tree(options.grace)
    finally:
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
        await proxy.stop()
    return _exit_code(returncode), stop


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


def log_to_file(verbose: bool) -> Path:
    """Send tokencap's and mitmproxy's logs to a file; with `verbose`, to stderr as well."""
    log_dir = data_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "tokencap.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.setLevel(logging.INFO)
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
