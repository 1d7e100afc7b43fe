"""What every benchmark section shares: isolated measurement in a child process (so each peak RSS is
its own), markdown tables, and the thread setting every measurement runs under."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "@@BENCH_RESULT@@"


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A markdown table; floats printed with 3 significant decimals unless already strings."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def child_env() -> dict:
    """The environment of a measured child process: no progress bars, this checkout importable."""
    env = dict(os.environ, LLMFAB_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def run_isolated(target: str, kwargs: dict | None = None, *, threads: int | None = None, timeout: float = 1800) -> dict:
    """Call `module:function(**kwargs)` in a fresh Python process and return its JSON-able result dict,
    with `peak_rss_mb` (the child's maximum resident set) and `process_seconds` added."""
    env = child_env()
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs or {})],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_MARK))
    result = json.loads(line[len(RESULT_MARK) :])
    result["process_seconds"] = time.time() - start
    return result


def _child(target: str, kwargs_json: str) -> None:
    import importlib

    module, _, name = target.partition(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    # ru_maxrss is KiB on Linux: the peak of this whole process, model and optimizer included.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
