"""Metric tables: ``test/<row>/<metric>`` keys as one row per model or baseline."""

from __future__ import annotations

from collections import defaultdict


def metric_rows(metrics: dict[str, float]) -> tuple[list[str], dict[str, dict[str, float]], dict[str, float]]:
    """Split ``{"test/model/mse": .., "test/stpe_x": ..}`` into columns, rows and other values."""
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    others: dict[str, float] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3:
            rows[parts[1]][parts[2]] = value
        else:
            others[parts[-1]] = value
    columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c.endswith("_orig"), c))
    return columns, dict(rows), others


def markdown_table(metrics: dict[str, float]) -> str:
    columns, rows, others = metric_rows(metrics)
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values.get(c, float('nan')):.4f}" for c in columns) + " |")
    lines += [f"\n{k}: {v:.4f}" for k, v in others.items()]
    return "\n".join(lines)


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """A Rich table on stdout (``_orig``: in the data's original units)."""
    from rich.console import Console
    from rich.table import Table

    columns, rows, others = metric_rows(metrics)
    table = Table(title=title)
    table.add_column("")
    for c in columns:
        table.add_column(c, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.4f}" if c in values else "" for c in columns))
    console = Console(width=max(100, 14 * (len(columns) + 1)))
    console.print(table)
    for key, value in others.items():
        console.print(f"{key}: {value:.4f}")
