"""Tables that stay whole on a narrow terminal.

Rich squeezes a table wider than the terminal by cutting cells ("17,5…") or breaking words mid-word.
`show` prints the table as it is when every column can keep its longest word (rich then only wraps
at spaces), and otherwise folds it: one block per row, one "column: value" line per cell.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

# Columns of a folded row are indented this much under the row's first cell.
INDENT = 2
UNBOUNDED = 1 << 20


def fits(table: Table, console: Console) -> bool:
    """True when rich draws `table` at the console's width without cutting a number or breaking a word.

    Rich narrows the widest wrapping columns first, below their longest word if need be, so a table
    whose minimum width fits may still lose a header's tail; compare each column's width with its minimum.
    """
    wide = console.options.update_width(UNBOUNDED)
    if Measurement.get(console, wide, table).minimum > console.width:
        return False
    widths = table._calculate_column_widths(console, console.options.update_width(console.width - table._extra_width))
    minima = [table._measure_column(console, wide, column).minimum for column in table.columns]
    return all(w >= m for w, m in zip(widths, minima))


def _text(cell) -> Text:
    if isinstance(cell, Text):
        return cell.copy()
    return Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))


def _header(column) -> str:
    return column.header.plain if isinstance(column.header, Text) else str(column.header)


def folded_lines(table: Table) -> list[tuple[int, Text]]:
    """(indent, line) pairs of the folded form: per row its first cell, then "header: value" for the others."""
    columns = table.columns
    cells = [list(c.cells) for c in columns]
    out: list[tuple[int, Text]] = []
    for row in range(table.row_count):
        first = _text(cells[0][row])
        head = Text(f"{_header(columns[0])}: ") + first
        out.append((0, head))
        for col, column in enumerate(columns[1:], start=1):
            value = _text(cells[col][row])
            if not value.plain.strip():
                continue
            out.append((INDENT, Text(f"{_header(column)}: ") + value))
    return out


def show(console: Console, table: Table) -> None:
    """Print `table` whole: as drawn when it fits the console's width, folded row by row otherwise."""
    if fits(table, console):
        console.print(table)
        return
    if table.title:
        title = table.title if isinstance(table.title, Text) else Text.from_markup(str(table.title), style="italic")
        console.print(title)
    for indent, line in folded_lines(table):
        line.overflow = "fold"
        console.print(Padding(line, (0, 0, 0, indent), expand=False), highlight=False)
