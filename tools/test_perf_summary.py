#!/usr/bin/env python3
"""Checks of tools/perf_summary.py (standard library only: ``python3 tools/test_perf_summary.py``).

A work directory is built from two synthetic reports (one with GPTAQ_PROFILE phases), a steps.txt
with an nvidia-smi peak and a criterion log; the summary must carry each number to its row, sum the
phases over layers, and skip unrelated or broken JSON files.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import perf_summary as ps  # noqa: E402


def report(method: str, secs: list[float], phases: bool) -> dict:
    layers = []
    for i, s in enumerate(secs):
        layer = {"layer": i, "secs": s, "hidden_rel_error": 0.1}
        if phases:
            layer["phases"] = [["forward", 1.0 + i], ["solve/sweep", 0.25], ["solve", 2.0]]
        layers.append(layer)
    return {
        "method": method,
        "nsamples": 16,
        "secs": sum(secs) + 1.0,
        "peak_gpu_bytes": 3 << 30,
        "plan": {"gpu_bytes_estimate": 5 << 30, "batch_sequences": 1, "streams_on_gpu": False,
                 "stream_dtype": "f16", "act_streams": False, "weights_ahead": True},
        "layers": layers,
        "modules": [{"layer": 0, "module": "down_proj", "secs": 1.5},
                    {"layer": 1, "module": "q_proj", "secs": 0.2}],
    }


class PerfSummary(unittest.TestCase):
    def test_summary_rows(self):
        with tempfile.TemporaryDirectory() as d:
            for name, r in [("l8b_gptaq", report("gptaq", [10.0, 12.0], False)),
                            ("prof_gptq", report("gptq", [3.0, 5.0], True))]:
                with open(os.path.join(d, f"{name}.json"), "w", encoding="utf-8") as f:
                    json.dump(r, f)
            with open(os.path.join(d, "torch_bench.json"), "w", encoding="utf-8") as f:
                json.dump({"solve": 1.0}, f)
            with open(os.path.join(d, "broken.json"), "w", encoding="utf-8") as f:
                f.write("{ not json")
            with open(os.path.join(d, "steps.txt"), "w", encoding="utf-8") as f:
                f.write("l8b_gptaq rc=0 50.0s (limit 200)\nl8b_gptaq nvidia-smi peak MiB: 7777\n")
            with open(os.path.join(d, "kbench.log"), "w", encoding="utf-8") as f:
                f.write("gemm_f32/4096x4096x4096 A·Bᵀ Large\n"
                        "                        time:   [6.0000 ms 6.1100 ms 6.2000 ms]\n")
            out = io.StringIO()
            with redirect_stdout(out):
                self.assertEqual(ps.main(["perf_summary.py", d]), 0)
            text = out.getvalue()
        rows = {line.split("|")[1].strip(): line for line in text.splitlines()
                if line.startswith("| l8b") or line.startswith("| prof")}
        self.assertEqual(set(rows), {"l8b_gptaq", "prof_gptq"})
        cells = [c.strip() for c in rows["l8b_gptaq"].split("|")[1:-1]]
        # run, method, layers, s/layer, run s, app peak, nvidia-smi, plan, batch, streams, act, ahead
        self.assertEqual(cells, ["l8b_gptaq", "gptaq", "2", "11.00", "23.0", "3,072", "7777",
                                 "5,120", "1", "host f16", "no", "yes"])
        self.assertIn("| - |", rows["prof_gptq"], "no nvidia-smi peak for the profile run")
        self.assertIn("forward 3.00, solve 4.00", text)  # summed over the two layers
        self.assertIn("solve: sweep 0.500", text)
        self.assertIn("L0 down_proj 1.50s", text)
        self.assertNotIn("l8b_gptaq (", text, "no phases line for a report without phases")
        self.assertIn("- gemm_f32/4096x4096x4096 A·Bᵀ Large: 6.1100 ms", text)

    def test_bad_arguments(self):
        self.assertEqual(ps.main(["perf_summary.py"]), 2)
        self.assertEqual(ps.main(["perf_summary.py", "/nonexistent/dir"]), 2)


if __name__ == "__main__":
    unittest.main()
