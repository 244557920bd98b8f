"""`tokencap run`: start the proxy, run the agent behind it, stop the tree on a cap."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tokencap import __version__, agents, attribution, certs, providers, routing
from tokencap.agents import AgentProfile
from tokencap.budgets import BudgetRule, LedgerBudgets, applicable
from tokencap.caps import Budget, Refusal
from tokencap.environment import child_environment
from tokencap.errors import EXIT_CAPPED, ConfigError
from tokencap.ledger import Ledger, data_dir
from tokencap.meter import Session
from tokencap.prices import PriceOverride, Pricer, from_pico
from tokencap.proxy import Proxy
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
    # Agent profile by name; None picks it from the command.
    profile: str | None = None
    # Host patterns the HTTPS proxy intercepts besides the providers' own, such as
    # "llm-gateway.example.com" or "*.inference.example.com".
    intercept_hosts: tuple[str, ...] = ()
    # Cumulative budgets from the budget files; the run checks those that match its attribution.
    budget_rules: list[BudgetRule] = field(default_factory=list)
    prices: list[PriceOverride] = field(default_factory=list)
    unknown_model: str = "highest"


@dataclass
class RunResult:
    """The outcome of a run: exit status, end reason, spend and what was stopped."""

    session_id: str
    exit_code: int
    end_reason: str
    spent_usd: Decimal
    calls: int
    refusal: Refusal | None
    stop: StopResult | None
    unknown_models: set[tuple[str, str]]
    profile: str = "generic"
    # Model-API traffic that reached upstream without being metered, one line each.
    unmetered: list[str] = field(default_factory=list)
    # Upstream URL -> the last connection error, for upstreams that could not be reached.
    unreachable: dict[str, str] = field(default_factory=dict)


def run(options: RunOptions) -> RunResult:
    """Run the agent under the caps and return how it ended."""
    env = dict(os.environ)
    upstreams = providers.upstreams_from_env(env)
    chain = routing.chain_from_env(env)
    profile = _profile(options)
    extra_hosts = intercept_patterns(options.intercept_hosts, env)
    # Check the command before recording a session, so a typo leaves no trace in the ledger.
    resolve_executable(options.argv[0], env, None)
    trust = certs.prepare(data_dir() / "ca", env)
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
            exit_code, stop, unmetered = EXIT_CAPPED, None, []
        else:
            budget.shared = shared
            become_subreaper()
            session = Session(
                session_id,
                ledger,
                budget,
                pricer,
                upstreams,
                on_trip=lambda refusal: None,
                profile=profile,
                overrides=providers.overrides_from_env(env),
                extra_hosts=extra_hosts,
                unreachable=unreachable,
            )
            exit_code, stop, unmetered = asyncio.run(
                _supervise(options, env, session, trust, chain)
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
        profile=profile.name,
        unmetered=unmetered,
        unreachable=unreachable,
    )


async def _supervise(
    options: RunOptions,
    env: dict[str, str],
    session: Session,
    trust: certs.Trust,
    chain: routing.Chain | None,
) -> tuple[int, StopResult | None, list[str]]:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_trip(refusal: Refusal) -> None:
        # A refusal that did not come from the budget, such as an unpriced model, still ends
        # the run as capped.
        session.budget.refuse(refusal)
        if not stop_requested.is_set():
            logger.info("session %s stopped: %s", session.session_id, refusal.message)
            proxy.addon.cut_all_streams()
            stop_requested.set()

    session.on_trip = on_trip
    proxy = Proxy(session, str(trust.ca_dir), str(trust.upstream_bundle), chain)
    await proxy.start()
    logger.info(
        "session %s: base-URL route on 127.0.0.1:%d, HTTPS proxy on 127.0.0.1:%d, profile %s",
        session.session_id,
        proxy.port,
        proxy.proxy_port,
        session.profile.name,
    )

    try:
        child_env = child_environment(
            env,
            session_id=session.session_id,
            profile=session.profile,
            base_urls={p.name: proxy.base_url(p.name) for p in providers.PROVIDERS},
            proxy_url=proxy.proxy_url,
            trust=trust,
            extra_hosts=session.extra_hosts,
        )
        child = Child.spawn(options.argv, child_env)
        stopping_tree = False

        def on_signal(sig: signal.Signals) -> None:
            # A second SIGINT or SIGTERM while the tree is being stopped skips the grace period.
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
    unmetered = proxy.addon.escapes.lines()
    for line in unmetered:
        logger.warning("unmetered model traffic: %s", line)
    return _exit_code(returncode), stop, unmetered


def _profile(options: RunOptions) -> AgentProfile:
    try:
        return agents.profile_for(options.argv, options.profile)
    except KeyError:
        names = ", ".join(sorted(agents.BY_NAME))
        raise ConfigError(
            f"unknown agent profile {options.profile!r}; use one of {names}"
        ) from None


def intercept_patterns(patterns: tuple[str, ...], env: dict[str, str]) -> tuple[str, ...]:
    """Validate configured host patterns, and add the hosts of https upstream overrides.

    A gateway named in ANTHROPIC_BASE_URL or OPENAI_BASE_URL is intercepted too, so an agent
    that reads its own configuration instead of the variable is still metered there.
    """
    result = []
    for pattern in patterns:
        host = pattern.strip().lower()
        if not host or "/" in host or ":" in host or " " in host:
            raise ConfigError(
                f"invalid intercepted host {pattern!r}: give a host name such as "
                "llm.example.com or a wildcard such as *.example.com, without scheme or port"
            )
        result.append(host)
    for upstream in providers.overrides_from_env(env).values():
        if upstream.scheme == "https" and not routing.is_loopback(upstream.host):
            result.append(upstream.host.lower())
    return tuple(dict.fromkeys(result))


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
