"""`python -m benchmarks`: every section in turn, its tables printed as it finishes, all results in one
JSON file. Sections: throughput (against TRL), overhead (a family pipeline under kfp.local), scaling
(sequence length and width), efficacy (every family's stages over seeds). The GPU script is separate:
`python -m benchmarks.gpu` (bf16, ~0.5B shape) on a machine with a GPU."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT

SECTIONS = ("throughput", "overhead", "scaling", "efficacy")


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs (checks the plumbing, not speed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--efficacy-scale", type=float, help="share of the tiny preset's steps (default 1: its own)")
    parser.add_argument("--efficacy-seeds", type=int, nargs="+", help="seeds of the efficacy runs (default 0 1 2)")
    args = parser.parse_args(argv)
    options = {"efficacy": {"scale": args.efficacy_scale, "seeds": args.efficacy_seeds}}
    report = {"machine": machine(), "quick": args.quick, "sections": {}}
    print(f"# llmfab benchmarks ({report['machine']['date']}, {report['machine']['cpus']} CPUs)", flush=True)
    start = time.time()
    for name in args.only:
        began = time.time()
        result = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick, **options.get(name, {}))
        result["seconds"] = time.time() - began
        report["sections"][name] = result
        print(f"\n## {name} ({result['seconds']:.0f} s)\n", flush=True)
        print("\n\n".join(result["tables"]), flush=True)
    report["seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nall sections: {report['seconds']:.0f} s; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
