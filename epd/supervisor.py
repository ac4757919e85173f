"""A small process supervisor (``epd up``): start shell commands, forward their output,
restart the ones that exit, stop them all on request.

Lifecycle of one process::

    start ─▶ running ──exits──▶ backoff ──delay──▶ running ─▶ …   restart="unless-stopped"
                        └─────▶ exited (stays down; the others keep running)   restart="no"
    stop(): running ──SIGTERM to its group──▶ stopped (exits within stop_timeout_s)
                                           └─▶ killed  (SIGKILL to its group after that)

- Each process runs ``/bin/sh -c <command>`` in a new session (``start_new_session``), so it
  is its own process group: signals reach whatever the command started, a terminal's Ctrl-C
  reaches only the supervisor, and a process's leftovers are SIGKILLed with its group when it
  exits.
- Restart delay (compose's ``unless-stopped``, Kubernetes' CrashLoopBackOff): ``backoff_s``
  after the first exit, doubled per consecutive exit up to ``backoff_max_s``. A run that lasted
  ``stable_s`` (60 s) or more counts as healthy: the next exit starts from ``backoff_s`` again.
  An exit with code 0 (e.g. after ``epd drain``) is restarted too. The child gets
  ``EPD_RESTARTS=<n>`` (restarts of that process so far; 0 at the first start).
- Output: one reader thread per run forwards each line as ``HH:MM:SS name | line``
  (coloured on a terminal); the supervisor's own lines use the name ``supervisor``.
- ``run()`` in the main thread handles SIGINT/SIGTERM: the first stops (as :meth:`stop`), a
  second one at least ``repeat_signal_s`` later kills every group at once (as :meth:`kill`;
  a signal delivered twice, to a wrapper and to us, is not a second Ctrl-C).
- Changes while running (any thread; the loop carries them out at its next turn):
  :meth:`add` starts a new process, :meth:`retire` stops one for good (SIGTERM to its group,
  SIGKILL after ``stop_timeout_s``; state ``retired``, never restarted), :meth:`respawn` starts
  one that is down again (optionally with a new spec), :meth:`set_spec` changes the spec the
  next restart uses. ``epd up``'s elastic controller (:mod:`epd.elastic`) scales encoders and
  records role switches with them; the e2e tests start and kill single processes with them.
- ``ProcessSpec.log_file``: that process's lines go to the file (appended, unprefixed)
  instead of the shared output.
- ``run()`` returns 0 when every process's last exit was clean (code 0, or death by the
  SIGTERM the stop sent), 1 otherwise (a crash left down or pending restart, a SIGKILLed
  straggler). It returns by itself only when no process is left to supervise (restart="no").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

RESTART_POLICIES = ("unless-stopped", "no")
_DOWN = ("new", "exited", "stopped", "killed", "retired")  # states with no process running (respawn-able)
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)
_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process: ``command`` runs under ``/bin/sh -c`` with ``env`` (None: ours) in ``cwd``."""

    name: str
    command: str
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    log_file: str | None = None  # this process's output goes here (appended) instead of the shared output


@dataclass(frozen=True)
class ProcessStatus:
    """A snapshot of one process: ``pid`` of the current or last run (0 before the first),
    ``state`` one of ``new`` (not started), ``running``, ``backoff``, ``exited``, ``stopped``, ``killed``,
    ``retiring`` (SIGTERM sent by :meth:`Supervisor.retire`), ``retired``."""

    name: str
    pid: int
    state: str
    restarts: int
    returncode: int | None


@dataclass
class _Child:
    spec: ProcessSpec
    colour: int
    popen: subprocess.Popen | None = None
    state: str = "new"
    restarts: int = 0
    crashes: int = 0  # consecutive exits since the last stable run
    started_at: float = 0.0
    restart_at: float = 0.0
    returncode: int | None = None
    readers: list[threading.Thread] = field(default_factory=list)
    retire: bool = False  # retire() asked; the loop sends SIGTERM and never restarts it
    retire_deadline: float = 0.0


class Supervisor:
    """Run ``specs`` until :meth:`stop`, :meth:`kill` or a signal (see the module docstring).

    Raises ValueError for an unknown ``restart`` policy, duplicate names or non-positive times.
    """

    poll_s = 0.05
    repeat_signal_s = 1.0

    def __init__(self, specs: Sequence[ProcessSpec], *, restart: str = "unless-stopped",
                 backoff_s: float = 1.0, backoff_max_s: float = 30.0, stop_timeout_s: float = 10.0,
                 stable_s: float = 60.0, output: TextIO | None = None) -> None:
        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart policy {restart!r}: expected one of {RESTART_POLICIES}")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("process names must be unique")
        if min(backoff_s, backoff_max_s, stop_timeout_s, stable_s) <= 0:
            raise ValueError("backoff_s, backoff_max_s, stop_timeout_s and stable_s must be > 0")
        self.restart = restart
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.stop_timeout_s, self.stable_s = stop_timeout_s, stable_s
        self.output = output if output is not None else sys.stdout
        self._children = [_Child(s, _COLOURS[i % len(_COLOURS)]) for i, s in enumerate(specs)]
        self._width = max([len("supervisor")] + [len(s.name) for s in specs])
        self._tty = hasattr(self.output, "isatty") and self.output.isatty()
        self._lock = threading.Lock()  # output lines and status snapshots
        self._stop = threading.Event()
        self._kill = threading.Event()
        self._signals: list[float] = []  # appended by the handler only (no locks in signal handlers)
        self._signals_seen = 0

    # -- public API (any thread) --------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """True once a stop was requested (by :meth:`stop`, :meth:`kill` or a signal)."""
        return self._stop.is_set()

    def wait_stopping(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a stop request; returns :attr:`stopping`."""
        return self._stop.wait(timeout)

    def stop(self) -> None:
        """Ask ``run()`` to SIGTERM every process group and wait ``stop_timeout_s`` before SIGKILL."""
        self._stop.set()

    def kill(self) -> None:
        """Ask ``run()`` to SIGKILL every process group now."""
        self._kill.set()
        self._stop.set()

    def processes(self) -> list[ProcessStatus]:
        """A snapshot of every process, in the order given."""
        with self._lock:
            return [ProcessStatus(c.spec.name, c.popen.pid if c.popen else 0, c.state, c.restarts, c.returncode)
                    for c in self._children]

    def add(self, spec: ProcessSpec) -> None:
        """Start a new process at the loop's next turn (or with the others, before :meth:`run`).
        A name in use by a process that is down (retired, exited) is replaced.

        Raises:
            ValueError: the name belongs to a process that is running or restarting.
        """
        with self._lock:
            old = self._find(spec.name)
            if old is not None and old.state not in _DOWN:
                raise ValueError(f"process {spec.name!r} is {old.state}")
            if old is not None:
                self._children.remove(old)
            colour = _COLOURS[len(self._children) % len(_COLOURS)]
            self._children.append(_Child(spec, colour))
            self._width = max(self._width, len(spec.name))

    def retire(self, name: str) -> None:
        """Stop process ``name`` for good: SIGTERM to its group at the loop's next turn (it
        drains), SIGKILL after ``stop_timeout_s``; it is never restarted (state ``retired``).

        Raises:
            KeyError: no such process.
        """
        with self._lock:
            child = self._get(name)
            if child.state in _DOWN:
                child.state = "retired"
            else:
                child.retire = True

    def respawn(self, name: str, spec: ProcessSpec | None = None) -> None:
        """Start process ``name`` again at the loop's next turn (counts as a restart), with
        ``spec`` instead of its current one if given.

        Raises:
            KeyError: no such process. ValueError: it is still running or restarting.
        """
        with self._lock:
            child = self._get(name)
            if child.state not in _DOWN:
                raise ValueError(f"process {name!r} is {child.state}")
            child.spec = spec or child.spec
            child.restarts += 1
            child.state, child.retire = "new", False

    def set_spec(self, name: str, spec: ProcessSpec) -> None:
        """Use ``spec`` from the next (re)start of process ``name`` on; the running one is untouched.

        Raises:
            KeyError: no such process.
        """
        with self._lock:
            self._get(name).spec = spec

    def pid(self, name: str) -> int:
        """Pid of the current or last run of ``name`` (0 before its first start).

        Raises:
            KeyError: no such process.
        """
        with self._lock:
            child = self._get(name)
            return child.popen.pid if child.popen else 0

    def _find(self, name: str) -> _Child | None:
        return next((c for c in self._children if c.spec.name == name), None)

    def _get(self, name: str) -> _Child:
        child = self._find(name)
        if child is None:
            raise KeyError(f"no process {name!r}")
        return child

    def say(self, message: str) -> None:
        """Print one line as the supervisor (the same format and lock as the processes' lines)."""
        self._print("supervisor", message, 1)

    # -- the loop (one thread: run's) ---------------------------------------------------
    def run(self) -> int:
        """Start every process and supervise until stopped; returns the exit code (module docstring)."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda _s, _f: self._signals.append(time.monotonic()))
        try:
            for child in self._children:
                if not self.stopping:
                    self._spawn(child)
            while not self._stop.wait(self.poll_s) and not self._take_signals():
                now = time.monotonic()
                with self._lock:
                    children = list(self._children)
                for child in children:
                    self._step(child, now)
                if all(c.state in ("exited", "retired") for c in children):
                    self.say("every process has exited (restart=no)")
                    break
            return self._shutdown()
        except BaseException:
            self._kill.set()
            self._shutdown()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _take_signals(self) -> bool:
        """Turn signals noted by the handler into stop/kill; True when stopping."""
        while self._signals_seen < len(self._signals):
            at = self._signals[self._signals_seen]
            first = self._signals[0]
            self._signals_seen += 1
            if self._signals_seen == 1:
                self.stop()
            elif at - first >= self.repeat_signal_s and not self._kill.is_set():
                self.say("second signal: killing every process now")
                self.kill()
        return self.stopping

    def _spawn(self, child: _Child) -> None:
        env = {**(child.spec.env if child.spec.env is not None else os.environ), "EPD_RESTARTS": str(child.restarts)}
        popen = subprocess.Popen(child.spec.command, shell=True, env=env, cwd=child.spec.cwd,
                                 start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=self._forward, args=(child, popen), daemon=True,
                                  name=f"output-{child.spec.name}")
        reader.start()
        with self._lock:
            child.popen, child.state, child.started_at = popen, "running", time.monotonic()
            child.readers = [t for t in child.readers if t.is_alive()] + [reader]

    def _forward(self, child: _Child, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        log_file = child.spec.log_file
        with popen.stdout:
            if log_file:
                with open(log_file, "ab") as fh:
                    for raw in popen.stdout:
                        fh.write(raw)
                        fh.flush()
                return
            for raw in popen.stdout:
                self._print(child.spec.name, raw.decode("utf-8", "replace").rstrip("\r\n"), child.colour)

    def _print(self, name: str, line: str, colour: int) -> None:
        prefix = f"{time.strftime('%H:%M:%S')} {name.ljust(self._width)} | "
        if self._tty:
            prefix = f"\033[{colour}m{prefix}\033[0m"
        with self._lock:
            print(prefix + line, file=self.output, flush=True)

    def _step(self, child: _Child, now: float) -> None:
        if child.state == "new":
            self._spawn(child)
        elif child.state in ("running", "retiring"):
            if child.retire and child.state == "running":
                self.say(f"{child.spec.name}: retiring (SIGTERM; SIGKILL after {self.stop_timeout_s:g} s)")
                _killpg(child.popen.pid, signal.SIGTERM)
                with self._lock:
                    child.state, child.retire_deadline = "retiring", now + self.stop_timeout_s
            code = _reap(child.popen)
            if code is not None:
                self._on_exit(child, code, now)
            elif child.state == "retiring" and now >= child.retire_deadline:
                _killpg(child.popen.pid, signal.SIGKILL)
        elif child.state == "backoff" and child.retire:
            with self._lock:
                child.state = "retired"
        elif child.state == "backoff" and now >= child.restart_at:
            with self._lock:
                child.restarts += 1
            self._spawn(child)

    def _on_exit(self, child: _Child, code: int, now: float) -> None:
        name = child.spec.name
        if child.retire:
            with self._lock:
                child.state, child.returncode, child.retire = "retired", code, False
            self.say(f"{name} retired (exit code {code})")
            return
        if self.restart == "no":
            with self._lock:
                child.state, child.returncode = "exited", code
            self.say(f"{name} exited with code {code}; not restarting (restart=no)")
            return
        if now - child.started_at >= self.stable_s:
            child.crashes = 0
        delay = min(self.backoff_s * 2 ** min(child.crashes, 32), self.backoff_max_s)
        with self._lock:
            child.crashes += 1
            child.state, child.returncode, child.restart_at = "backoff", code, now + delay
        self.say(f"{name} exited with code {code}; restarting in {delay:.1f} s (restart {child.restarts + 1})")

    def _shutdown(self) -> int:
        running = [c for c in self._children if c.state in ("running", "retiring")]
        if running:
            self.say(f"stopping: SIGTERM to {len(running)} process(es), SIGKILL after {self.stop_timeout_s:g} s "
                     "(Ctrl-C again: now)")
        for child in running:
            _killpg(child.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while running and time.monotonic() < deadline and not self._kill.is_set():
            self._take_signals()
            for child in running:
                if (code := _reap(child.popen)) is not None:
                    with self._lock:
                        child.state, child.returncode = "stopped", code
            running = [c for c in running if c.state in ("running", "retiring")]
            self._kill.wait(self.poll_s)
        for child in running:
            self.say(f"{child.spec.name} still running: SIGKILL")
            _killpg(child.popen.pid, signal.SIGKILL)
            code = child.popen.wait()
            with self._lock:
                child.state, child.returncode = "killed", code
        for child in self._children:
            for reader in child.readers:
                reader.join(timeout=1.0)
        started = [c for c in self._children if c.popen is not None]
        clean = all(c.returncode in CLEAN_EXIT_CODES for c in started)
        codes = ", ".join(f"{c.spec.name} {c.returncode}" for c in started)
        self.say(f"stopped ({'clean' if clean else 'not clean'}); last exit codes: {codes or 'none'}")
        return 0 if clean else 1


def _reap(popen: subprocess.Popen) -> int | None:
    """The exit code once the process has exited, else None. Before reaping it, SIGKILL what
    it left in its group: while the leader is a zombie its pid (the group id) cannot be reused."""
    if popen.returncode is None:
        try:
            if os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return None
        except ChildProcessError:  # already reaped
            pass
        else:
            _killpg(popen.pid, signal.SIGKILL)
    return popen.poll()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass
