"""kfp.local's output, one log file per task: what its tasks print (and kfp.local's own lines about them) goes to
LOG_DIR/TASK.log instead of the terminal. A task's end is reported to a callback with its status; a training task's
progress lines (tqdm's `12/400 [`) drive a progress callback instead of filling its log."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
PROGRESS = re.compile(r"(\d+)/(\d+) \[")
PIPELINE_LOG = "pipeline"


class TaskLogs(io.TextIOBase):
    """A text stream (stdout and stderr during a kfp.local run) that files each line under the running task."""

    def __init__(
        self,
        log_dir: str | Path,
        on_finished: Callable[[str, str, Path], None] | None = None,
        on_started: Callable[[str], None] | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.on_finished, self.on_started, self.on_progress = on_finished, on_started, on_progress
        self.task = PIPELINE_LOG
        self._pending = ""
        self._files: dict[str, io.TextIOWrapper] = {}

    def path(self, task: str) -> Path:
        return self.log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.log"

    def _file(self, task: str):
        if task not in self._files:
            self._files[task] = self.path(task).open("a", encoding="utf-8")
        return self._files[task]

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = ANSI.sub("", line)
        if started := STARTED.search(plain):
            self.task = started.group(1)
            if self.on_started:
                self.on_started(self.task)
        progress = PROGRESS.search(plain)
        if progress and self.on_progress and self.task != PIPELINE_LOG:
            self.on_progress(self.task, int(progress.group(1)), int(progress.group(2)))
            return  # a progress bar's update: shown live, not kept
        out = self._file(self.task)
        out.write(plain + "\n")
        out.flush()
        if finished := FINISHED.search(plain):
            task, status = finished.groups()  # its outputs follow: the task stays current until the next starts
            if self.on_finished:
                self.on_finished(task, status, self.path(task))

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        for f in self._files.values():
            f.close()
        self._files.clear()
        super().close()
