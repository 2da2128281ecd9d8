"""What every fuzz case must satisfy, checked the same way for every file mmer parses.

A call into mmer on a mutated file may return (then the family's oracle judges the result) or raise an
:class:`~mmer.errors.MmerError`. Anything else is a failure: another exception (a traceback in the CLI), no
outcome within the time bound (a hang), or a file-system change outside the work directory (seen by an audit
hook on every ``open``/``rename``/``remove``... Python makes, and by comparing a sentinel directory before and
after). Failures are grouped into classes (where raised, exception type, message head) and each class is
reported once with the seed and mutations that replay it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer.errors import MmerError

MASTER_SEED = os.environ.get("MMER_FUZZ_SEED", "13")
CASES = int(os.environ.get("MMER_FUZZ_CASES", "200"))  # per family and mutation style
ONLY = os.environ.get("MMER_FUZZ_ONLY")  # "family/style:3,17": replay just these cases
REPORT = os.environ.get("MMER_FUZZ_REPORT")  # append every failure class, as JSON lines, to this file
CASE_SECONDS = float(os.environ.get("MMER_FUZZ_CASE_SECONDS", "5"))
MEMORY_HEADROOM = 4 * 1024**3  # a case may not grow the address space by more than this

MMER_ROOT = str(Path(__import__("mmer").__file__).resolve().parent.parent) + os.sep


def case_indices(family: str, weight: int = 1, count: int | None = None) -> list[int]:
    """The cases of ``family`` (``"headers/bytes"``) to run: all of them, or those named by MMER_FUZZ_ONLY.

    ``weight`` multiplies MMER_FUZZ_CASES for a family whose edits are targeted and rare classes hide; ``count``
    replaces it for a family that enumerates a fixed list of edits.
    """
    count = CASES * weight if count is None else count
    if not ONLY:
        return list(range(count))
    name, _, indices = ONLY.partition(":")
    if name != family:
        return []
    return [int(i) for i in indices.split(",") if i.strip()] if indices else list(range(count))


def case_seed(family: str, index: int) -> str:
    """A string seed (``random.Random`` hashes it with SHA-512): the same case on every run and machine."""
    return f"{MASTER_SEED}:{family}:{index}"


class CaseTimeout(BaseException):
    """No outcome within the time bound. A BaseException, so that mmer's ``except Exception`` cannot hide it."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"no outcome after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def memory_bound(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space so that a file claiming a huge size ends in MemoryError, not in the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    limit = current + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------- file-system watch

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event → (position of a path it changes, position of the dir_fd that path is relative to, or None)
_CHANGE_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.mkdir": ((0, 2),),
    "os.rmdir": ((0, 1),),
    "os.remove": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((1, 3),),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.chflags": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)),
    "tempfile.mkstemp": ((0, None),),
    "tempfile.mkdtemp": ((0, None),),
}


class FileWatch:
    """While armed, records every change Python makes outside ``work`` and every read inside ``sentinel``.

    One audit hook per process (hooks cannot be removed); disarmed it returns at once.
    """

    _instance: FileWatch | None = None

    def __init__(self) -> None:
        self.work: str | None = None
        self.sentinel: str | None = None
        self.events: list[str] = []

    @classmethod
    def get(cls) -> FileWatch:
        if cls._instance is None:
            cls._instance = cls()
            sys.addaudithook(cls._instance._hook)
        return cls._instance

    @contextmanager
    def armed(self, work: Path, sentinel: Path) -> Iterator[list[str]]:
        self.work, self.sentinel = os.path.realpath(work) + os.sep, os.path.realpath(sentinel) + os.sep
        self.events = []
        try:
            yield self.events
        finally:
            self.work = self.sentinel = None

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.work is None:
            return
        try:
            if event == "open":
                path, mode, flags = args
                writing = isinstance(flags, int) and flags & _WRITE_FLAGS or (mode and set(mode) & set("wax+"))
                self._check(event + (" for writing" if writing else ""), path, writing=bool(writing))
            elif event in _CHANGE_EVENTS:
                for i, fd in _CHANGE_EVENTS[event]:
                    if i < len(args):
                        dir_fd = args[fd] if fd is not None and fd < len(args) else None
                        self._check(event, args[i], writing=True, dir_fd=dir_fd)
        except Exception:  # an audit hook must never turn an operation into an error of its own
            pass

    def _check(self, event: str, path: Any, writing: bool, dir_fd: Any = None) -> None:
        if isinstance(path, int) or path is None:
            return
        path = os.fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            # shutil.rmtree and friends work relative to an open directory, not to the cwd
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        if writing and not (real + os.sep).startswith(self.work) and not real.startswith("/dev/"):
            self.events.append(f"{event} {real} (outside {self.work})")
        elif not writing and (real + os.sep).startswith(self.sentinel):
            self.events.append(f"{event} {real} (read from outside the input)")


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Name → (size, mtime, mode) of everything under ``root``: compared before and after to see a change."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            state[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return state


# ----------------------------------------------------------------------------------------------- outcomes


@dataclass
class Failure:
    family: str
    kind: str  # "raised", "hang", "wrote outside", "wrong result", "not refused"
    detail: str  # the exception type, or the oracle that failed
    where: str  # the innermost mmer function on the traceback, or the call that was made
    message: str
    seed: str
    index: int
    ops: list[str]
    call: str = ""  # the mmer call that was made

    def key(self) -> tuple[str, ...]:
        return (self.family.split("/")[0], self.kind, self.detail, self.where, _normalise(self.message))


def _normalise(message: str) -> str:
    """The first words of a message with paths, quoted names and numbers blanked: one bug, one class."""
    message = re.sub(r"/\S+", "<path>", message)
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    message = re.sub(r"0x[0-9a-fA-F]+|\d+", "#", message)
    return " ".join(message.split()[:5])


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    inside = [f for f in frames if f.filename.startswith((MMER_ROOT + "mmer" + os.sep, MMER_ROOT + "cli" + os.sep))]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{os.path.relpath(frame.filename, MMER_ROOT)}:{frame.name}"


@dataclass
class FuzzRun:
    """One family's cases: runs calls under the bounds and collects failures into classes."""

    family: str
    work: Path
    sentinel: Path
    failures: list[Failure] = field(default_factory=list)
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    after: list[Callable[[FuzzRun], None]] = field(default_factory=list)  # checks once all cases ran

    def case(self, index: int, ops: list[str]) -> Case:
        self.cases += 1
        return Case(self, index, case_seed(self.family, index), ops)

    def finish(self) -> None:
        """Fail the test with one paragraph per failure class, each with the first case that shows it."""
        for check in self.after:
            check(self)
        print(f"{self.family}: {self.cases} cases; outcomes {dict(sorted(self.outcomes.items()))}")
        if REPORT:
            with open(REPORT, "a") as f:
                for failures in self._classes().values():
                    first = failures[0]
                    f.write(json.dumps({**first.__dict__, "count": len(failures)}) + "\n")
        if not self.failures:
            return
        lines = [f"{self.family}: {len(self.failures)} failures in {self.cases} cases, {len(self._classes())} classes"]
        for failures in self._classes().values():
            f = failures[0]
            calls = ", ".join(dict.fromkeys(x.call for x in failures if x.call))
            lines.append(
                f"\n[{len(failures)}x] {f.kind}: {f.detail} at {f.where} (via {calls})\n    {f.message[:300]}\n"
                f"    replay: MMER_FUZZ_SEED={MASTER_SEED} MMER_FUZZ_ONLY={f.family}:{f.index} (seed {f.seed!r})\n"
                f"    mutations: {'; '.join(f.ops)[:400]}"
            )
        raise AssertionError("\n".join(lines))

    def _classes(self) -> dict[tuple[str, ...], list[Failure]]:
        classes: dict[tuple[str, ...], list[Failure]] = {}
        for f in self.failures:
            classes.setdefault(f.key(), []).append(f)
        return classes


_REFUSED = object()


@dataclass
class Case:
    run: FuzzRun
    index: int
    seed: str
    ops: list[str]

    def fail(self, kind: str, detail: str, where: str, message: str, call: str = "") -> None:
        self.run.failures.append(
            Failure(self.run.family, kind, detail, where, message, self.seed, self.index, list(self.ops), call)
        )

    def call(
        self, what: str, fn: Callable[..., Any], *args: Any, write_root: Path | None = None, **kwargs: Any
    ) -> Any:
        """``fn(*args)`` under the time bound and the file watch: its result, or the MmerError it raised.

        Returns ``None`` (after recording the failure) when it raised anything else or hung. A write outside
        ``write_root`` (the work directory by default; a writer's own output folder for a writer) is a failure.
        """
        watch = FileWatch.get()
        outcome: Any = None
        failed = len(self.run.failures)
        with watch.armed(write_root or self.run.work, self.run.sentinel) as events:
            try:
                with time_bound(CASE_SECONDS):
                    outcome = fn(*args, **kwargs)
            except MmerError as err:
                outcome = err
                if not err.message:
                    self.fail("raised", f"{type(err).__name__} without a message", _where(err), "", what)
            except CaseTimeout as err:
                self.fail("hang", "CaseTimeout", _where(err), str(err), what)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: B036 - every other exception is a finding
                self.fail("raised", type(err).__name__, _where(err), str(err)[:300], what)
        for event in dict.fromkeys(events):
            kind = "read outside" if event.endswith("(read from outside the input)") else "wrote outside"
            self.fail(kind, event.split()[0], what, event, what)
        key = "refused" if isinstance(outcome, MmerError) else "returned"
        key = "failed" if len(self.run.failures) > failed else key
        self.run.outcomes[f"{what} {key}"] = self.run.outcomes.get(f"{what} {key}", 0) + 1
        return outcome

    def require(self, ok: bool, oracle: str, what: str, message: str = "") -> None:
        """An oracle on an outcome: ``oracle`` names the property that must hold (a spec, not a symptom)."""
        if not ok:
            self.fail("wrong result", oracle, what, message or oracle, what)

    def refused(self, outcome: Any, oracle: str, what: str) -> None:
        """The input is invalid, so ``outcome`` must be an MmerError (a returned result is a silent accept)."""
        if outcome is not None and not isinstance(outcome, MmerError):
            self.fail("not refused", oracle, what, f"returned {type(outcome).__name__}", what)
