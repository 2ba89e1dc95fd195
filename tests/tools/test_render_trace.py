#!/usr/bin/env python3
"""Checks examples/timeline/render_trace.py on a synthetic trace.

Run by ctest (tools.render_trace) as: python3 test_render_trace.py RENDERER.
Exit 0: pass; 1: fail; 77: skipped (no matplotlib for this interpreter).
"""
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_trace():
    """Two ranks, lanes main (tid 0) and copy (tid 1), two steps each."""
    events = []
    for pid in (0, 1):
        for tid, lane in ((0, "main"), (1, "copy")):
            events.append({"name": "thread_name", "ph": "M", "pid": pid,
                           "tid": tid, "args": {"name": lane}})
        for step in range(2):
            t = 10000.0 * step + 100 * pid

            def x(name, cat, ts, dur, tid):
                events.append({"name": name, "cat": cat, "ph": "X",
                               "ts": t + ts, "dur": dur, "pid": pid,
                               "tid": tid})
            x("step", "train", 0, 9000, 0)
            x("load expert 3", "load", 0, 3000, 1)
            x("experts_forward", "compute", 500, 2000, 0)
            x("wait expert 3", "wait", 2500, 800, 0)
            x("experts_backward", "compute", 3300, 4000, 0)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    check(head[:8] == PNG_SIGNATURE, f"{path}: no PNG signature")
    check(head[12:16] == b"IHDR", f"{path}: no IHDR chunk first")
    return struct.unpack(">II", head[16:24])


failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what)
    return ok


def main():
    if importlib.util.find_spec("matplotlib") is None:
        print("skipped: no matplotlib for", sys.executable)
        return 77
    renderer = sys.argv[1]

    def run(*args):
        r = subprocess.run([sys.executable, renderer, *args],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr

    with tempfile.TemporaryDirectory() as tmp:
        def path(name):
            return os.path.join(tmp, name)

        with open(path("trace.json"), "w") as f:
            json.dump(synthetic_trace(), f)

        out = path("out.png")
        rc, err = run(path("trace.json"), out, "--width", "12")
        if check(rc == 0, f"whole trace: exit {rc}: {err}") and \
                check(os.path.exists(out), "whole trace: no out.png"):
            w, h = png_size(out)
            # 4 lanes: main holds "step" and, one row down, the events
            # inside it (2 rows); copy 1 row; 3 gaps of half a row. The
            # renderer's layout: 0.3 in a row, 1.5 in title/legend/axis.
            want_h = 100 * (1.5 + 0.3 * (2 + 1 + 2 + 1 + 3 * 0.5))
            check(w == 1200, f"width {w} px, want 1200 (--width 12)")
            check(abs(w / h - 1200 / want_h) < 0.1 * 1200 / want_h,
                  f"size {w}x{h}: want a width/height ratio near "
                  f"{1200 / want_h:.2f}")

        with open(path("bare.json"), "w") as f:
            json.dump(synthetic_trace()["traceEvents"], f)
        step = path("step.png")
        rc, err = run(path("bare.json"), step, "--step", "0", "--title", "T")
        if check(rc == 0, f"--step 0: exit {rc}: {err}"):
            check(png_size(step)[0] > 0, "--step 0: empty PNG")
        rc, err = run(path("trace.json"), path("w.png"), "--from", "2",
                      "--to", "4")
        check(rc == 0, f"--from 2 --to 4: exit {rc}: {err}")

        with open(path("bad.json"), "w") as f:
            f.write("this is not json {")
        with open(path("empty.json"), "w") as f:
            json.dump({"traceEvents": []}, f)
        for args, says in (((path("bad.json"),), "not JSON"),
                           ((path("empty.json"),), "no complete"),
                           ((path("missing.json"),), "cannot read"),
                           ((path("trace.json"), "--from", "50"),
                            "no events"),
                           ((path("trace.json"), "--step", "7"), "2 steps")):
            rc, err = run(*args, path("bad.png"))
            check(rc == 2, f"{args[-1]}: exit {rc}, want 2")
            check(says in err and "Traceback" not in err,
                  f"{args[-1]}: stderr {err!r} should say {says!r}")
        check(not os.path.exists(path("bad.png")), "bad input wrote a PNG")
    print("FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
