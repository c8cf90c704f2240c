"""Where an orchestrator process spends its CPU, by component: py-spy samples its stacks
while the same load runs on after the measuring window, each sample goes to the component
whose code it is in, and the process's CPU time over the measuring window (/proc) is split in
the samples' proportions.

    cpu_s = ... the measuring window, unprofiled ...
    with OrchestratorProfile(pid) as profile:
        ... the same load, untimed ...
    profile.per_job_ms(cpu_s, jobs)  # {"submit": 0.4, "wait": 0.2, ...}

The sampler never runs while a figure is timed: reading a busy process's stacks 100 times a
second took about half a core here (measured: 1.5 ms of py-spy CPU per no-op job on
PostgreSQL, 0.6 on SQLite), CPU the orchestrator's cores would lose to it and its baseline
never pays. py-spy (``pip install -e '.[bench]'``) needs to read the process's memory (ptrace);
where it cannot, ``per_job_ms`` is empty and ``problem`` says why.

Only the thread holding the GIL is sampled (``--gil``): the orchestrator's request threads
spend much of their time waiting, for PostgreSQL's answer (psycopg's ``Connection.wait``: 35 %
of all samples in a run of row b without ``--gil``) or to take the GIL back after a system
call (samples that land on whatever line made it, ``uuid4`` for one), and such samples would
count as the CPU of the component that waited. What the GIL holder runs is the process's
Python work; the C work done without the GIL (libpq, the kernel) is split in the same
proportions. Samples that land in a wait anyway (``WAITS``, as the GIL is taken or given back
around it) are left out too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SAMPLES_PER_S = 100
STOP_TIMEOUT_S = 10.0

# First match wins, in this order: dispatch runs inside a submit or a lease poll, and is its own
# component. Each entry: (component, fragments of a frame's "function (file" text).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dispatch", ("LeaseService.dispatch ", "LeaseService.explain_unplaced")),
    (
        "submit",
        (
            "submit_batch (",
            "submit_job (",
            "BatchJobs.submit ",
            "JobService.submit ",
            "BatchJobs.waiting_reasons ",
        ),
    ),
    (
        "wait",
        (
            "wait_jobs (",
            "get_job (",
            "get_result (",
            "BatchJobs.states ",
            "BatchJobs.results ",
            "BatchJobs.get ",
            "JobService.get ",
            "JobService.result ",
        ),
    ),
    (
        "lease",
        (
            "lease (orchestrator",
            "LeaseService.start_poll",
            "LeaseService.open_poll",
            "LeaseService.claim",
            "LeaseService.close_poll",
        ),
    ),
    ("results", ("complete_batch (", "complete_job (", "start_job (", "LeaseService.complete")),
    ("sweep+heartbeats", ("sweep", "heartbeat", "Sweeper")),
    ("http+json (uvicorn, starlette, pydantic)", ("uvicorn/", "starlette/", "fastapi/", "h11/")),
)
OTHER = "other"
WAITS = (
    "Condition.wait ",
    "Lock.acquire",
    "select (",
    "poll (",
    "epoll",
    "Event.wait ",
    "_worker (concurrent",
    "sleep (",
)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def component(frames: list[str]) -> str | None:
    """The component a sample (its frames, outermost first) belongs to; None for a wait."""
    if frames and any(w in frames[-1] for w in WAITS):
        return None
    for name, fragments in COMPONENTS:
        if any(fragment in frame for frame in frames for fragment in fragments):
            return name
    return OTHER


def shares(raw: str) -> Counter[str]:
    """Samples per component from py-spy's raw (collapsed stacks) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        found = component(stack.split(";"))
        if found is not None:
            counts[found] += int(n)
    return counts


class OrchestratorProfile:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.counts: Counter[str] = Counter()
        self.problem: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> OrchestratorProfile:
        tool = py_spy()
        if tool is None:
            self.problem = "no CPU breakdown: py-spy is not installed (pip install -e '.[bench]')"
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="gpumarket-profile-")
        args = [tool, "record", "--pid", str(self.pid), "--rate", str(SAMPLES_PER_S)]
        args += ["--gil", "--format", "raw", "--nonblocking", "--output", str(self._out)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    @property
    def _out(self) -> Path:
        assert self._dir is not None
        return Path(self._dir.name) / "stacks.txt"

    def __exit__(self, *_: object) -> None:
        try:
            if self._proc is None:
                return
            self._proc.send_signal(signal.SIGINT)  #: py-spy writes what it sampled and exits
            try:
                err = self._proc.communicate(timeout=STOP_TIMEOUT_S)[1]
            except subprocess.TimeoutExpired:
                self._proc.kill()
                err = self._proc.communicate()[1]
            if self._out.exists():
                self.counts = shares(self._out.read_text(errors="replace"))
            if not self.counts:
                said = err.decode(errors="replace").strip().splitlines()
                self.problem = f"no CPU breakdown: py-spy sampled nothing ({said[-1:]})"
        finally:
            if self._dir is not None:
                with contextlib.suppress(OSError):
                    self._dir.cleanup()

    def per_job_ms(self, cpu_s: float, jobs: int) -> dict[str, float]:
        """The process's CPU (``cpu_s`` seconds over the window) per job, in milliseconds,
        split by component, largest first."""
        total = sum(self.counts.values())
        if not total or jobs <= 0:
            return {}
        per_job_ms = cpu_s / jobs * 1000
        return {name: per_job_ms * n / total for name, n in self.counts.most_common()}

    def describe(self, cpu_s: float, jobs: int) -> str:
        """``orchestrator CPU per job X ms: submit a, wait b, ...`` (or why there is none)."""
        parts = self.per_job_ms(cpu_s, jobs)
        total = cpu_s / jobs * 1000 if jobs else 0.0
        head = f"orchestrator CPU per job {total:.2f} ms"
        if not parts:
            return f"{head} ({self.problem or 'no samples'})"
        return f"{head}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items())
