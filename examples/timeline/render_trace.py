#!/usr/bin/env python3
"""Render a semoe Chrome trace (SEMOE_TRACE=trace.json) as a timeline PNG.

    python3 examples/timeline/render_trace.py trace.json out.png
        [--from MS] [--to MS] [--step N] [--title T] [--width IN]

One horizontal lane per (pid, tid), i.e. per rank and thread/stream/queue,
labelled from thread_name/process_name metadata when present ("rank 0 · copy").
Each complete ("X") event is a bar colored by category (compute, comm, load,
store, optimizer, ...); nested events stack downwards inside their lane; names
are written in bars wide enough. "wait" bars (a layer waiting on a late
prefetch) are red and hatched. The time axis is in ms from the window start.

The window is the whole trace, or --from/--to in ms after the first event, or
with --step N the N-th (0-based) "step" event of each rank (the trainer's
"train_step" if there is none). Bad input (missing file, not JSON, no events
in the window): a message on stderr, exit code 2. Needs python3-matplotlib.
"""
import argparse
import json
import os
import sys

PALETTE = {  # category -> (face, text); "wait" is also hatched
    "compute": ("#4C78A8", "white"), "comm": ("#F58518", "black"),
    "load": ("#54A24B", "white"), "store": ("#B279A2", "white"),
    "optimizer": ("#EECA3B", "black"), "train": ("#BAB0AC", "black"),
    "wait": ("#E45756", "black")}
SPARE = [("#72B7B2", "black"), ("#9D755D", "white"), ("#FF9DA6", "black"),
         ("#79706E", "white"), ("#B6992D", "black"), ("#439894", "white")]
PLAIN = dict(edgecolor="white", linewidth=0.3)
EDGES = {"wait": dict(edgecolor="#7F0000", linewidth=0.8, hatch="//")}
DPI, ROW_IN, GAP = 100, 0.3, 0.5  # inches per row; lane gap, in rows
TOP_IN, BOTTOM_IN = 0.9, 0.6      # title + legend; time axis
STEP_NAMES = ("step", "train_step")


def fail(message):
    print(f"render_trace: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_events(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path} is not JSON: {e}")
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        fail(f"{path}: no traceEvents list")
    names, spans = {}, []
    for e in (e for e in events if isinstance(e, dict)):
        pid, tid = e.get("pid", 0), e.get("tid", 0)
        if e.get("ph") == "M" and isinstance(e.get("args"), dict):
            key = {"thread_name": (pid, tid),
                   "process_name": pid}.get(e.get("name"))
            if key is not None and "name" in e["args"]:
                names[key] = str(e["args"]["name"])
        elif e.get("ph") == "X" and isinstance(e.get("ts"), (int, float)):
            dur = e.get("dur") if isinstance(e.get("dur"), (int, float)) else 0
            spans.append((float(e["ts"]), max(float(dur), 0.0), pid, tid,
                          str(e.get("name", "")), str(e.get("cat", ""))))
    if not spans:
        fail(f"{path}: no complete (\"X\") events")
    return spans, names


def window(spans, args):
    """The (begin, end) in trace us that the picture shows."""
    t0 = min(s[0] for s in spans)
    if args.step is None:
        lo = t0 + 1e3 * args.start if args.start is not None else t0
        hi = (t0 + 1e3 * args.end if args.end is not None
              else max(s[0] + s[1] for s in spans))
        if hi <= lo:  # lanes() finds none in a window that is not empty
            fail(f"no events in the selected window ({(lo - t0) / 1e3:g} ms "
                 f"to {(hi - t0) / 1e3:g} ms after the first event)")
        return lo, hi
    for name in STEP_NAMES:
        per_pid = {}  # the N-th step of each rank: the union of their ranges
        for s in sorted(spans, key=lambda s: s[0]):
            if s[4] == name:
                per_pid.setdefault(s[2], []).append(s)
        hits = [v[args.step] for v in per_pid.values() if args.step < len(v)]
        if hits:
            return min(h[0] for h in hits), max(h[0] + h[1] for h in hits)
        if per_pid:
            n = max(len(v) for v in per_pid.values())
            fail(f"--step {args.step}: the trace has {n} steps")
    fail("--step: the trace has no \"step\" events")


def lanes(spans, lo, hi):
    """{(pid, tid): [(begin, dur, depth, name, cat)]} in the window."""
    out = {}
    for s in sorted(spans, key=lambda s: (s[0], -s[1])):
        if lo <= s[0] < hi or s[0] < lo < s[0] + s[1]:
            out.setdefault((s[2], s[3]), []).append(s)
    for key, evs in out.items():
        ends, out[key] = [], []  # ends of the enclosing events: the depth
        for ts, dur, _, _, name, cat in evs:
            while ends and ends[-1] <= ts:
                ends.pop()
            out[key].append((ts, dur, len(ends), name, cat))
            ends.append(ts + dur)
    return out


def render(spans, names, args):
    lo, hi = window(spans, args)
    by_lane = lanes(spans, lo, hi)
    if not by_lane:
        fail("no events in the selected window")
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import patches, pyplot as plt
    except ImportError:
        fail("needs matplotlib (python3-matplotlib)")
    keys = sorted(by_lane, key=lambda k: [(isinstance(x, str), x) for x in k])
    rows = [1 + max(e[2] for e in by_lane[k]) for k in keys]
    total = sum(rows) + GAP * (len(keys) - 1)
    height = TOP_IN + BOTTOM_IN + ROW_IN * max(total, 2)
    labels = [f"{names.get(p, f'rank {p}')} · {names.get((p, t), f'lane {t}')}"
              for p, t in keys]
    left = 0.3 + 0.075 * max(len(s) for s in labels)  # inches
    fig = plt.figure(figsize=(args.width, height), dpi=DPI)
    ax = fig.add_axes([left / args.width, BOTTOM_IN / height,
                       1 - (left + 0.25) / args.width,
                       1 - (TOP_IN + BOTTOM_IN) / height])
    span_ms = (hi - lo) / 1e3
    ms_per_px = span_ms / ((args.width - left - 0.25) * DPI)
    cats = sorted({e[4] for evs in by_lane.values() for e in evs},
                  key=lambda c: ((*PALETTE, c).index(c), c))
    colors = {c: PALETTE.get(c) or SPARE[i % len(SPARE)]
              for i, c in enumerate(cats)}
    y, ticks, bars = 0.0, [], {}
    for key, n in zip(keys, rows):
        ticks.append(y + n / 2)
        for ts, dur, depth, name, cat in by_lane[key]:
            x0 = (max(ts, lo) - lo) / 1e3
            w = max((min(ts + dur, hi) - lo) / 1e3 - x0, ms_per_px)
            bars.setdefault((y + depth, cat), []).append((x0, w))
            room = int((w / ms_per_px - 6) / 6)  # ~6 px a character
            if room >= 3:
                ax.text(x0 + w / 2, y + depth + 0.5, name if len(name) <= room
                        else name[:room - 1] + "…", ha="center", va="center",
                        fontsize=7, color=colors[cat][1], clip_on=True,
                        zorder=4, weight="bold" if cat == "wait" else "normal")
        y += n + GAP
        if y < total:
            ax.axhline(y - GAP / 2, color="#CCCCCC", linewidth=0.6)
    for (row, cat), xs in bars.items():
        ax.broken_barh(xs, (row + 0.08, 0.84), facecolor=colors[cat][0],
                       **EDGES.get(cat, PLAIN))
    ax.set(xlim=(0, span_ms), ylim=(total, 0), axisbelow=True)
    ax.set_yticks(ticks, labels, fontsize=9)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#E5E5E5", linewidth=0.6)
    first = min(s[0] for s in spans)
    ax.set_xlabel(f"ms from the window start ({(lo - first) / 1e3:.3f} ms "
                  "after the first event)", fontsize=9)
    swatches = [patches.Patch(label=c or "(none)", facecolor=colors[c][0],
                              **EDGES.get(c, PLAIN)) for c in cats]
    fig.legend(handles=swatches,
               loc="upper center", frameon=False, ncol=min(len(cats), 8),
               fontsize=9, bbox_to_anchor=(0.5, 1 - 0.42 / height))
    fig.suptitle(args.title or os.path.basename(args.trace) + (
        f" · step {args.step}" if args.step is not None else ""),
        y=1 - 0.08 / height, va="top", fontsize=11)
    try:
        fig.savefig(args.out, dpi=DPI)
    except OSError as e:
        fail(f"cannot write {args.out}: {e.strerror}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="Chrome trace JSON")
    p.add_argument("out", help="the PNG to write")
    win = p.add_mutually_exclusive_group()
    win.add_argument("--from", dest="start", type=float, metavar="MS")
    win.add_argument("--step", type=int, metavar="N")
    p.add_argument("--to", dest="end", type=float, metavar="MS")
    p.add_argument("--title", metavar="T")
    p.add_argument("--width", type=float, default=14.0, metavar="IN")
    args = p.parse_args(argv)
    if args.step is not None and args.end is not None:
        p.error("--step and --to exclude each other")
    if (args.step or 0) < 0 or args.width < 2:
        p.error("--step must be >= 0 and --width >= 2")
    render(*load_events(args.trace), args)


if __name__ == "__main__":
    main()
