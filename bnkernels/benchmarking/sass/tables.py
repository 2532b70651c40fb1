"""Text and markdown tables of the SASS report (shared by :mod:`.report` and
:mod:`.bytes_model`, which import nothing of each other's)."""

from __future__ import annotations


def access_widths(bits: dict) -> str:
    """{"128": 2, "32": 5} -> "128x2/32x5" (widest first)."""
    return "/".join(f"{b}x{n}" for b, n in sorted(bits.items(), key=lambda kv: -int(kv[0]))) \
        or "-"


def fmt_table(rows: list[dict], columns) -> list[str]:
    """Fixed-width text lines, a header first."""
    cells = [[c for c, _ in columns]] + [[fmt.format(r[c]) if r[c] is not None else "-"
                                          for c, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def md_table(rows: list[dict], columns) -> list[str]:
    head = [c for c, _ in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(fmt.format(r[c]) if r[c] is not None else "-"
                                     for c, fmt in columns) + " |")
    return out
