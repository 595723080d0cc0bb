"""Result tables for the terminal: columns and rows drawn with borders, long cells cut.
Imports nothing of m3db."""


def format_table(columns, rows, max_width=60) -> str:
    cells = [[format_cell(v, max_width) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |", line]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    out += [line, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"]
    return "\n".join(out)


def format_cell(value, max_width) -> str:
    """One value as table text: NULL for None, on one line, cut to max_width with '...'."""
    text = "NULL" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 3] + "..."
