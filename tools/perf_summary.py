#!/usr/bin/env python3
"""Markdown summary of a tools/device_perf.sh work directory, printed at the end of that script.

The device tool returns only the last lines of a call's output and a few files, so the numbers
that go into BENCHMARKS.md are condensed here: one row per `gptaq-studio quantize --report` JSON
(seconds per layer, app peak, the plan's estimate and choices, nvidia-smi's peak from steps.txt),
the per-phase seconds of every report that has them (GPTAQ_PROFILE=1), and the criterion medians
of the kernel bench log. Standard library only; missing or partial files are skipped, never fatal.

Usage: python3 tools/perf_summary.py WORK_DIR
"""
from __future__ import annotations

import json
import os
import re
import sys

MIB = float(1 << 20)


def smi_peaks(work: str) -> dict[str, str]:
    """`NAME nvidia-smi peak MiB: N` lines of steps.txt, by step name."""
    peaks: dict[str, str] = {}
    try:
        with open(os.path.join(work, "steps.txt"), encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^(\S+) nvidia-smi peak MiB: (\S*)", line)
                if m:
                    peaks[m.group(1)] = m.group(2) or "?"
    except OSError:
        pass
    return peaks


def load_reports(work: str) -> list[tuple[str, dict]]:
    out = []
    for name in sorted(os.listdir(work)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(work, name), encoding="utf-8") as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "layers" in r and "modules" in r and "plan" in r:
            out.append((name[:-5], r))
    return out


def report_rows(reports: list[tuple[str, dict]], peaks: dict[str, str]) -> list[str]:
    rows = [
        "| run | method | layers | s/layer | run s | app peak MiB | nvidia-smi MiB | plan MiB "
        "| batch | streams | act kept | weights ahead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in reports:
        layers = r.get("layers") or []
        secs = [l.get("secs", 0.0) for l in layers]
        plan = r.get("plan") or {}
        per_layer = sum(secs) / len(secs) if secs else float("nan")
        streams = "GPU" if plan.get("streams_on_gpu") else f"host {plan.get('stream_dtype', '?')}"
        rows.append(
            f"| {name} | {r.get('method', '?')} | {len(layers)} | {per_layer:.2f} | "
            f"{r.get('secs', float('nan')):.1f} | {r.get('peak_gpu_bytes', 0) / MIB:,.0f} | "
            f"{peaks.get(name, '-')} | {plan.get('gpu_bytes_estimate', 0) / MIB:,.0f} | "
            f"{plan.get('batch_sequences', '?')} | {streams} | "
            f"{'yes' if plan.get('act_streams') else 'no'} | "
            f"{'yes' if plan.get('weights_ahead') else 'no'} |"
        )
    return rows


def phase_rows(reports: list[tuple[str, dict]]) -> list[str]:
    """Seconds per phase, summed over layers, for reports with `phases` (GPTAQ_PROFILE=1)."""
    rows: list[str] = []
    for name, r in reports:
        totals: dict[str, float] = {}
        for layer in r.get("layers") or []:
            for phase, secs in layer.get("phases") or []:
                totals[phase] = totals.get(phase, 0.0) + float(secs)
        if not totals:
            continue
        main = {k: v for k, v in totals.items() if not k.startswith("solve/")}
        solve = {k[6:]: v for k, v in totals.items() if k.startswith("solve/")}
        rows.append(f"**{name}** ({r.get('nsamples', '?')} sequences): " + ", ".join(
            f"{k} {v:.2f}" for k, v in main.items()))
        if solve:
            rows.append("  solve: " + ", ".join(f"{k} {v:.3f}" for k, v in solve.items()))
        slow = sorted(r.get("modules") or [], key=lambda m: -m.get("secs", 0.0))[:4]
        if slow:
            rows.append("  slowest solves: " + ", ".join(
                f"L{m.get('layer')} {m.get('module')} {m.get('secs', 0.0):.2f}s" for m in slow))
    return rows


def bench_rows(work: str) -> list[str]:
    """`name` / `time: [lo mid hi]` pairs of the criterion log (kbench.log), medians only."""
    rows: list[str] = []
    try:
        with open(os.path.join(work, "kbench.log"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return rows
    name = None
    for line in lines:
        s = line.strip()
        if re.match(r"^[a-z_0-9]+/\S", s) and "time:" not in s:
            name = s
        m = re.search(r"time:\s*\[\S+ \S+ (\S+ \S+) \S+ \S+\]", s)
        if m and name:
            rows.append(f"- {name}: {m.group(1)}")
            name = None
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    work = argv[1]
    if not os.path.isdir(work):
        print(f"{work}: not a directory", file=sys.stderr)
        return 2
    reports = load_reports(work)
    print("## perf summary\n")
    if reports:
        print("\n".join(report_rows(reports, smi_peaks(work))))
        phases = phase_rows(reports)
        if phases:
            print("\nPhases (seconds, all layers):\n")
            print("\n".join(phases))
    bench = bench_rows(work)
    if bench:
        print("\nKernel bench medians:\n")
        print("\n".join(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
