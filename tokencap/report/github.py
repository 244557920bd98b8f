"""The markdown summary of a run that `tokencap run` appends to a GitHub Actions job summary."""

from __future__ import annotations

from pathlib import Path

from tokencap.ledger import Ledger
from tokencap.report.filters import Filters
from tokencap.report.formats import (
    all_input_tokens,
    cost_against_cap,
    markdown_table,
    money,
    number,
    session_status,
)
from tokencap.report.queries import grouped_report, session_detail
from tokencap.report.session_view import (
    calls_markdown,
    chart_markdown,
    facts_markdown,
    prompts_markdown,
)

# A job summary is limited to 1 MiB, and a runaway agent can make thousands of calls.
_CALLS_LISTED = 50
# Job summaries are shown to everyone who can read the repository, and a command line can
# carry a prompt or a credential, so these stay in the ledger.
_PRIVATE_FACTS = ("command", "directory", "host")


def write_github_summary(db_path: Path, session_id: str, summary_path: Path) -> None:
    """Append a markdown summary of one session to `summary_path` ($GITHUB_STEP_SUMMARY).

    Raises LedgerError when the ledger cannot be read and OSError when the file cannot be
    written; the run's outcome does not depend on either.
    """
    ledger = Ledger(db_path, create=False)
    try:
        detail = session_detail(ledger, session_id)
        by_model = grouped_report(ledger, ["model"], Filters(sessions=(session_id,)))
    finally:
        ledger.close()

    session = detail.session
    title = session["task"] or session["agent"] or session_id
    headline = f"### tokencap: {title} · {session_status(session)} · {cost_against_cap(session)}"
    rows = [
        [
            group.key["model"] or "(none)",
            number(group.totals.calls),
            number(group.totals.refused_calls),
            number(all_input_tokens(group.totals.tokens)),
            number(group.totals.tokens["output_tokens"]),
            money(group.totals.cost_usd),
        ]
        for group in by_model.groups
    ]
    headers = ["model", "calls", "refused", "input", "output", "cost"]
    sections = [
        headline,
        f"Session `{session_id}`",
        facts_markdown(detail, leave_out=_PRIVATE_FACTS),
        "#### Spend by model\n\n" + markdown_table(headers, rows, "lrrrrr") if rows else "",
        prompts_markdown(detail),
        chart_markdown(detail),
        calls_markdown(detail, limit=_CALLS_LISTED),
    ]
    text = "\n\n".join(section for section in sections if section) + "\n\n"
    with open(summary_path, "a", encoding="utf-8") as summary:
        summary.write(text)
