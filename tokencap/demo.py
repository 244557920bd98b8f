"""`tokencap demo`: the example agent under a dollar cap, against a local simulated provider.

The demo needs no API key and no network. The simulated provider listens on 127.0.0.1, and
tokencap forwards the agent's calls there because the base-URL variables point at it.
"""

from __future__ import annotations

import os
import shlex
import sys
from decimal import Decimal
from pathlib import Path

from tokencap import demo_agent, ledger, runner
from tokencap.cli import print_run_result
from tokencap.console import stderr_console
from tokencap.simulator import SimulatedProvider

# With the demo agent's conversation and claude-sonnet-4-5 prices from genai-prices 0.2.3, this
# cap admits 7 calls and refuses the 8th. tests/test_demo.py recomputes the count from the prices.
DEFAULT_MAX_USD = Decimal("0.05")

# Seconds the simulated provider waits before each response, so turns scroll at reading speed.
ANSWER_LATENCY = 0.25


def run_demo(db_path: Path | None, max_usd: Decimal | None) -> int:
    """Run the demo agent under tokencap against the simulated provider; return the exit status.

    The exit status is tokencap's: 86 when the cap stopped the agent, else the agent's own.
    """
    console = stderr_console()
    cap = max_usd or DEFAULT_MAX_USD
    path = db_path or ledger.default_path()

    with SimulatedProvider(latency=ANSWER_LATENCY) as simulator:
        console.print(
            f"[bold]tokencap demo:[/] a simulated model provider is listening on "
            f"{simulator.url}, so no API key or network is needed.\n"
            f"An example agent will call {demo_agent.MODEL} through tokencap, turn after turn, "
            f"until the ${cap} cap stops it."
        )
        # tokencap forwards each provider's calls to the URL its variable had when it started.
        # All three point at the simulator, so nothing the demo runs can reach a real provider.
        simulated = simulator.environment()
        previous = {name: os.environ.get(name) for name in simulated}
        os.environ.update(simulated)
        try:
            runner.log_to_file(False)
            result = runner.run(
                runner.RunOptions(
                    argv=[sys.executable, "-m", "tokencap.demo_agent"],
                    db_path=path,
                    task="demo",
                    agent="demo-agent",
                    max_usd=cap,
                    grace=1.0,
                )
            )
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    print_run_result(result)
    if result.refusal is None:
        console.print(
            f"tokencap: the demo agent ended with exit status {result.exit_code} after "
            f"{result.calls} calls and ${result.spent_usd}, within the ${cap} cap"
        )
    report = f"tokencap report --session {result.session_id}"
    if db_path is not None:
        report += f" --db {shlex.quote(str(db_path))}"
    console.print(f"See the recorded session and its calls with: [bold]{report}[/]")
    return result.exit_code
