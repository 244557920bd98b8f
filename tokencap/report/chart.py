"""A chart of a session's cumulative spend against its dollar cap, drawn with block characters."""

from __future__ import annotations

from decimal import Decimal

from rich.text import Text

from tokencap.prices import from_pico
from tokencap.report.formats import money

# One character cell is split into eighths of its height.
_BLOCKS = " ▁▂▃▄▅▆▇█"
_CAP_LINE = "╌"


def spend_chart(
    cumulative_pico: list[int],
    cap_pico: int | None,
    max_calls: int | None,
    *,
    width: int = 60,
    height: int = 10,
) -> Text:
    """Return a bar chart of spend after each call, with the dollar cap as a line.

    `cumulative_pico` is the spend in picodollars after each call sent upstream, in order.
    The x axis runs to `max_calls` when that is more than the calls made, so the chart shows
    how much of both caps a session used. Bars above the cap are red.
    """
    calls = len(cumulative_pico)
    slots = max(calls, max_calls or 0)
    if slots == 0:
        return Text("No calls were sent, so there is no spend to chart.")

    columns = _column_values(cumulative_pico, slots, width)
    spent = cumulative_pico[-1] if cumulative_pico else 0
    top = max(cap_pico or 0, spent, 1)
    eighths = [None if v is None else _scale(v, top, height * 8) for v in columns]
    cap_row = None
    if cap_pico is not None:
        cap_row = min(height - 1, max(0, -(-_scale(cap_pico, top, height * 8) // 8) - 1))

    labels = {height - 1: money(from_pico(top))}
    if cap_row is not None:
        labels[cap_row] = f"cap {money(from_pico(cap_pico))}"
    label_width = max(len(label) for label in [*labels.values(), "$0"])

    chart = Text()
    for row in range(height - 1, -1, -1):
        label = labels.get(row, "")
        chart.append(label.rjust(label_width) + (" ┤" if label else " │"), style="dim")
        for value, level in zip(columns, eighths, strict=True):
            chart.append(*_cell(row, value, level, cap_row, cap_pico))
        chart.append("\n")
    chart.append("$0".rjust(label_width) + " └" + "─" * len(columns) + "\n", style="dim")

    first, last = "call 1", f"call {slots}" + (" (max calls)" if max_calls == slots else "")
    gap = max(1, len(columns) - len(first) - len(last))
    chart.append(" " * (label_width + 2) + first + " " * gap + last + "\n", style="dim")
    summary = f"{calls} call{'s' if calls != 1 else ''}, {money(from_pico(spent))} spent"
    if cap_pico:
        share = Decimal(spent) / Decimal(cap_pico) * 100
        summary += f" of {money(from_pico(cap_pico))} ({share:.1f}%)"
    chart.append(" " * (label_width + 2) + summary)
    return chart


def _column_values(cumulative: list[int], slots: int, width: int) -> list[int | None]:
    """Return the spend shown in each column: after the last call it covers, None if none."""
    if slots <= width:
        repeat = width // slots
        return [
            cumulative[i] if i < len(cumulative) else None
            for i in range(slots)
            for _ in range(repeat)
        ]
    values: list[int | None] = []
    for column in range(width):
        end = (column + 1) * slots // width
        last = min(end, len(cumulative)) - 1
        start = column * slots // width
        values.append(cumulative[last] if start < len(cumulative) and last >= 0 else None)
    return values


def _scale(value: int, top: int, steps: int) -> int:
    # Integer rounding keeps the picture exact for picodollar amounts of any size.
    return (value * steps + top // 2) // top


def _cell(
    row: int, value: int | None, level: int | None, cap_row: int | None, cap_pico: int | None
) -> tuple[str, str]:
    over = cap_pico is not None and value is not None and value > cap_pico
    style = "red" if over else "cyan"
    if level is not None and level >= (row + 1) * 8:
        return "█", style
    if level is not None and level > row * 8:
        return _BLOCKS[level - row * 8], style
    if row == cap_row:
        return _CAP_LINE, "yellow"
    return " ", ""
