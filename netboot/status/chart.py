"""The page's chart of the last hour: boots started and handed over each minute, as bars of an SVG the server draws
(numbers only go into the page's template: no script draws it, and it shows without JavaScript)."""

from __future__ import annotations

from dataclasses import dataclass

WIDTH, HEIGHT = 720, 150
LEFT, RIGHT, TOP, BOTTOM = 34, 8, 12, 22  # the plot's margins: room for the scale and the minutes


@dataclass(frozen=True)
class Bar:
    kind: str  # "started" or "handed-over"
    x: float
    y: float
    width: float
    height: float
    count: int
    ago: int  # minutes ago


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int  # the count the plot's top stands for
    started: int  # in the whole hour
    handed_over: int
    ticks: list[tuple[float, str]]  # x, label
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom: float = HEIGHT - BOTTOM  # the plot's baseline


def boots_chart(per_minute: list[tuple[int, int, int]]) -> Chart:
    """`per_minute`: (minutes ago, started, handed over) for each minute, oldest first (Snapshot.per_minute)."""
    slots = max(len(per_minute), 1)
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_width / slots
    bar = max((slot - 2) / 2, 1.0)
    peak = max([1, *(max(started, handed) for _, started, handed in per_minute)])
    bars = []
    for i, (ago, started, handed) in enumerate(per_minute):
        for j, (kind, count) in enumerate((("started", started), ("handed-over", handed))):
            if count:
                height = plot_height * count / peak
                bars.append(Bar(kind, round(LEFT + i * slot + 1 + j * bar, 2), round(TOP + plot_height - height, 2),
                                round(bar, 2), round(height, 2), count, ago))
    oldest = per_minute[0][0] if per_minute else 0
    ticks = [(round(LEFT + (oldest - ago + 0.5) * slot, 2), f"{ago} min ago" if ago else "now")
             for ago in range(oldest - oldest % 15, -1, -15)]
    return Chart(bars, peak, sum(m[1] for m in per_minute), sum(m[2] for m in per_minute), ticks)
