#!/usr/bin/env python3
"""Draws the sustained P7 runs (bench_alerting's "plot" lines) as one chart, PNG or SVG.

Panels over the run's time: the agent's queue depth, publish -> alert latency, publish ->
row (age of the newest stored reading of the watched device) and, when the logs have it, the
bench process's RSS; one line per offered rate.

    cloud-ingest/bench/plot_p7.py [--title=TEXT] OUT.png LOG...   # LOG: bench_alerting output

A .svg name writes the SVG itself; a .png name renders it with headless Chromium (Debian's
`chromium`), which draws the text as well as the lines. Standard library only.
"""
import os
import shutil
import subprocess
import sys
import tempfile

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
PANELS = [
    ("queue", "agent queue depth (readings)", False),
    ("alert", "publish -> alert (s)", True),
    ("row", "publish -> row (s)", True),
    ("rss_mib", "RSS of the bench process: agent and cloud-ingest (MiB)", False),
]
W, H = 1200, 1150
TITLE = ("Plantlink P7 sustained: Mosquitto -> agent -> QUIC -> cloud-ingest (PostgreSQL, "
         "Kafka, 101 rules), one 2-core machine")
LEFT, RIGHT, TOP, GAP = 90, 40, 50, 40


def read(paths):
    """{series: {rate: [(t, v)]}} from the logs' "plot <series> <rate> t:v ..." lines."""
    data = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[0] != "plot":
                    continue
                points = []
                for p in parts[3:]:
                    t, _, v = p.partition(":")
                    points.append((float(t), float(v)))
                data.setdefault(parts[1], {})[int(parts[2])] = points
    return data


def nice_max(v):
    """A round axis top at or above v."""
    if v <= 0:
        return 1.0
    step = 10 ** len(str(int(v))) / 10 if v >= 1 else 0.1
    top = step
    while top < v:
        top += step
    return top


def svg(data, title=TITLE):
    panels = [p for p in PANELS if p[0] in data]
    rates = sorted({r for s in data.values() for r in s})
    t_max = max((t for s in data.values() for pts in s.values() for t, _ in pts), default=1)
    t_max = nice_max(t_max)
    top = TOP + 18 * len(rates)
    ph = (H - top - GAP * len(panels) - 20) / len(panels)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="DejaVu Sans, sans-serif" font-size="14">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="28" font-size="16">{title}</text>',
    ]
    for i, (rate, colour) in enumerate(zip(rates, COLOURS)):
        x = W - RIGHT - 160
        out.append(f'<rect x="{x}" y="{40 + i * 18}" width="14" height="4" fill="{colour}"/>')
        out.append(f'<text x="{x + 20}" y="{46 + i * 18}">{rate:,} readings/s</text>')
    for k, (name, title, seconds) in enumerate(panels):
        y0 = top + 20 + k * (ph + GAP)
        series = data.get(name, {})
        v_max = nice_max(max((v for pts in series.values() for _, v in pts), default=1))
        pw = W - LEFT - RIGHT
        out.append(f'<rect x="{LEFT}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{LEFT}" y="{y0 - 6}">{title}</text>')
        for j in range(5):
            v = v_max * j / 4
            y = y0 + ph - ph * j / 4
            label = f"{v:.2f}" if seconds else f"{int(v):,}"
            out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{LEFT - 8}" y="{y + 5}" text-anchor="end">{label}</text>')
        if seconds and v_max > 2:
            y = y0 + ph - ph * 2 / v_max
            out.append(
                f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y}" y2="{y}" stroke="#000" '
                f'stroke-dasharray="6,4"/><text x="{LEFT + pw - 4}" y="{y - 4}" '
                f'text-anchor="end">2 s goal</text>'
            )
        for j in range(6):
            t = t_max * j / 5
            x = LEFT + pw * j / 5
            out.append(f'<text x="{x}" y="{y0 + ph + 16}" text-anchor="middle">{int(t)} s</text>')
        for rate, colour in zip(rates, COLOURS):
            pts = series.get(rate, [])
            if not pts:
                continue
            path = " ".join(
                f"{LEFT + pw * t / t_max:.1f},{y0 + ph - ph * min(v, v_max) / v_max:.1f}"
                for t, v in pts
            )
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    args = sys.argv[1:]
    title = TITLE
    if args and args[0].startswith("--title="):
        title = args.pop(0)[len("--title="):]
    if len(args) < 2:
        sys.exit(__doc__)
    target, logs = args[0], args[1:]
    data = read(logs)
    if not data:
        sys.exit(f"no 'plot' lines in {', '.join(logs)}: run bench_alerting with --nocapture")
    text = svg(data, title.replace("&", "&amp;").replace("<", "&lt;"))
    if target.endswith(".svg"):
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
        return
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("a .png needs Debian's chromium (apt-get install chromium), or name a .svg")
    with tempfile.TemporaryDirectory() as tmp:
        page = os.path.join(tmp, "p7.svg")
        with open(page, "w", encoding="utf-8") as f:
            f.write(text)
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={W},{H}", f"--screenshot={os.path.abspath(target)}", page],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


if __name__ == "__main__":
    main()
