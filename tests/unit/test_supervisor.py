"""epd.supervisor with tiny ``python -c`` children: restart with a doubling backoff and
EPD_RESTARTS, restart="no" leaves one process down, stop/kill/signals leave no process behind,
output lines carry the process name."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from epd.supervisor import ProcessSpec, Supervisor

pytestmark = pytest.mark.timeout(60)

PY = shlex.quote(sys.executable)
ROOT = Path(__file__).resolve().parents[2]


def py(code: str) -> str:
    return f"exec {PY} -c {shlex.quote(code)}"


SLEEPER = py("import time; print('up', flush=True); time.sleep(60)")
IGNORES_TERM = py("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('pid', os.getpid(), flush=True); time.sleep(60)")


class Running:
    """``sup.run()`` in a thread; ``result`` once it returned."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup, self.result = sup, None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", sup.run()))
        self.thread.start()

    def join(self, timeout: float = 15) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        return self.result


def wait_for(pred, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie reparented to a PID 1 that does not reap counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def state(sup: Supervisor, name: str):
    return next(p for p in sup.processes() if p.name == name)


def test_crash_is_restarted_with_doubling_backoff_and_restart_count():
    out = io.StringIO()
    crasher = py("import os, sys; print('restarts', os.environ['EPD_RESTARTS'], flush=True); sys.exit(3)")
    sup = Supervisor([ProcessSpec("crasher", crasher)], backoff_s=0.1, backoff_max_s=0.4, output=out)
    run = Running(sup)
    wait_for(lambda: state(sup, "crasher").restarts >= 4 and "restarts 4" in out.getvalue())
    sup.stop()
    run.join()
    text = out.getvalue()
    delays = re.findall(r"crasher exited with code 3; restarting in ([\d.]+) s \(restart (\d+)\)", text)
    assert delays[:4] == [("0.1", "1"), ("0.2", "2"), ("0.4", "3"), ("0.4", "4")]
    assert [int(n) for n in re.findall(r"crasher +\| restarts (\d+)", text)][:5] == [0, 1, 2, 3, 4]


def test_backoff_resets_after_a_stable_run():
    out = io.StringIO()
    lives = py("import sys, time; time.sleep(0.3); sys.exit(1)")
    sup = Supervisor([ProcessSpec("p", lives)], backoff_s=0.1, backoff_max_s=10, stable_s=0.2, output=out)
    run = Running(sup)
    wait_for(lambda: state(sup, "p").restarts >= 2)
    sup.stop()
    run.join()
    delays = re.findall(r"restarting in ([\d.]+) s", out.getvalue())
    assert delays[:2] == ["0.1", "0.1"]


def test_restart_no_leaves_the_crashed_process_down_and_the_others_running():
    out = io.StringIO()
    specs = [ProcessSpec("crasher", py("import sys; sys.exit(5)")), ProcessSpec("sleeper", SLEEPER)]
    sup = Supervisor(specs, restart="no", backoff_s=0.05, output=out)
    run = Running(sup)
    wait_for(lambda: state(sup, "crasher").state == "exited" and "sleeper" in out.getvalue())
    time.sleep(0.3)  # several backoffs: it must still be down
    crasher, sleeper = state(sup, "crasher"), state(sup, "sleeper")
    assert (crasher.state, crasher.returncode, crasher.restarts) == ("exited", 5, 0)
    assert sleeper.state == "running" and alive(sleeper.pid)
    assert run.thread.is_alive()  # one crash does not stop the deployment
    assert "crasher exited with code 5; not restarting (restart=no)" in out.getvalue()
    sup.stop()
    assert run.join() == 1  # the crash is reported at the end
    assert state(sup, "sleeper").state == "stopped" and not alive(sleeper.pid)


def test_output_lines_are_prefixed_and_run_returns_when_nothing_is_left():
    out = io.StringIO()
    sup = Supervisor([ProcessSpec("greeter", py("print('hello'); print('world')")),
                      ProcessSpec("env", py("import os; print(os.environ['GREETING'])"), env={"GREETING": "hi"})],
                     restart="no", output=out)
    assert sup.run() == 0
    lines = out.getvalue().splitlines()
    stamp = r"\d\d:\d\d:\d\d "
    for name, text in (("greeter", "hello"), ("greeter", "world"), ("env", "hi")):
        assert any(re.fullmatch(rf"{stamp}{name} +\| {text}", line) for line in lines), lines


def test_stop_terminates_every_process_group():
    out = io.StringIO()
    graceful = py("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
                  "print('up', flush=True); time.sleep(60)")
    spawner = "sleep 60 & echo child $!; wait"  # the shell's child is in its group too
    sup = Supervisor([ProcessSpec("graceful", graceful), ProcessSpec("sleeper", SLEEPER),
                      ProcessSpec("spawner", spawner)], stop_timeout_s=10, output=out)
    run = Running(sup)
    wait_for(lambda: out.getvalue().count(" up") == 2 and "child " in out.getvalue())
    grandchild = int(re.search(r"child (\d+)", out.getvalue()).group(1))
    pids = [p.pid for p in sup.processes()] + [grandchild]
    assert all(alive(pid) for pid in pids)
    t0 = time.monotonic()
    sup.stop()
    assert sup.stopping
    assert run.join() == 0  # exit 0, or death by the SIGTERM sent
    assert time.monotonic() - t0 < 5
    assert {p.name: p.state for p in sup.processes()} == dict.fromkeys(("graceful", "sleeper", "spawner"), "stopped")
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)


def test_sigterm_ignored_is_sigkilled_after_stop_timeout():
    out = io.StringIO()
    sup = Supervisor([ProcessSpec("stubborn", IGNORES_TERM)], stop_timeout_s=0.5, output=out)
    run = Running(sup)
    wait_for(lambda: "pid " in out.getvalue())
    pid = state(sup, "stubborn").pid
    t0 = time.monotonic()
    sup.stop()
    assert run.join() == 1
    assert 0.5 <= time.monotonic() - t0 < 5
    st = state(sup, "stubborn")
    assert (st.state, st.returncode) == ("killed", -signal.SIGKILL)
    assert "stubborn still running: SIGKILL" in out.getvalue()
    assert not alive(pid)


def test_kill_does_not_wait_for_the_stop_timeout():
    out = io.StringIO()
    sup = Supervisor([ProcessSpec("stubborn", IGNORES_TERM)], stop_timeout_s=30, output=out)
    run = Running(sup)
    wait_for(lambda: "pid " in out.getvalue())
    t0 = time.monotonic()
    sup.stop()
    time.sleep(0.2)
    sup.kill()
    assert run.join() == 1
    assert time.monotonic() - t0 < 5


SCRIPT = """
import sys
from epd.supervisor import ProcessSpec, Supervisor
Supervisor.repeat_signal_s = 0.2
sys.exit(Supervisor([ProcessSpec("child", sys.argv[1])], stop_timeout_s=30).run())
"""


@pytest.mark.parametrize("child, signals, code", [
    (py("import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"), [signal.SIGTERM], 0),
    (IGNORES_TERM, [signal.SIGINT, signal.SIGINT], 1),  # second Ctrl-C: SIGKILL, no 30 s wait
])
def test_signals_to_the_supervisor(child, signals, code):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pid = int(re.fullmatch(r"\d\d:\d\d:\d\d child +\| pid (\d+)\n", line).group(1))
        for sig in signals:
            time.sleep(0.3)
            proc.send_signal(sig)
        assert proc.wait(timeout=10) == code
    finally:
        proc.kill()
    assert not alive(pid)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="restart policy"):
        Supervisor([], restart="always")
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ProcessSpec("a", "true"), ProcessSpec("a", "true")])
    with pytest.raises(ValueError, match="> 0"):
        Supervisor([], backoff_s=0)


def test_add_retire_respawn_while_running(tmp_path):
    """Processes added while running start; a retired one gets SIGTERM, is never restarted and
    does not count as a crash; respawn starts it again with a new spec; log_file takes its output."""
    out = io.StringIO()
    sup = Supervisor([ProcessSpec("base", SLEEPER)], backoff_s=0.1, stop_timeout_s=5, output=out)
    run = Running(sup)
    wait_for(lambda: state(sup, "base").state == "running")
    log = tmp_path / "extra.log"
    sup.add(ProcessSpec("extra", py("import time; print('extra up', flush=True); time.sleep(60)"),
                        log_file=str(log)))
    with pytest.raises(ValueError):
        sup.add(ProcessSpec("base", SLEEPER))  # running: not replaced
    wait_for(lambda: log.exists() and "extra up" in log.read_text())
    assert "extra up" not in out.getvalue()
    pid = sup.pid("extra")
    assert alive(pid)
    sup.retire("extra")
    wait_for(lambda: state(sup, "extra").state == "retired")
    assert not alive(pid)
    time.sleep(0.4)  # longer than the backoff: a retired process stays down
    assert state(sup, "extra").state == "retired" and state(sup, "extra").restarts == 0
    with pytest.raises(ValueError):
        sup.respawn("base")
    sup.respawn("extra", ProcessSpec("extra", py("import time; print('second', flush=True); time.sleep(60)"),
                                     log_file=str(log)))
    wait_for(lambda: "second" in log.read_text())
    assert state(sup, "extra").restarts == 1
    with pytest.raises(KeyError):
        sup.retire("nope")
    sup.stop()
    assert run.join() == 0


def test_set_spec_applies_from_the_next_restart():
    out = io.StringIO()
    first = py("import sys, time; print('first', flush=True); time.sleep(0.3); sys.exit(0)")
    sup = Supervisor([ProcessSpec("p", first)], backoff_s=0.1, output=out)
    run = Running(sup)
    wait_for(lambda: "first" in out.getvalue())
    sup.set_spec("p", ProcessSpec("p", SLEEPER.replace("'up'", "'switched'")))
    wait_for(lambda: "switched" in out.getvalue())
    sup.stop()
    assert run.join() == 0


def test_retire_escalates_to_sigkill():
    out = io.StringIO()
    sup = Supervisor([ProcessSpec("stubborn", IGNORES_TERM)], stop_timeout_s=0.5, output=out)
    run = Running(sup)
    wait_for(lambda: "pid" in out.getvalue())
    pid = sup.pid("stubborn")
    sup.retire("stubborn")
    wait_for(lambda: state(sup, "stubborn").state == "retired", 5)
    assert not alive(pid)
    assert run.join() == 1  # SIGKILLed: not a clean exit (and no process left: run returns)
