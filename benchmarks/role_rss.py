"""Start ``epd up --topology E-P-D`` from a source tree, time start-to-ready (launch to ``/health``
listing every role), send one sharegpt4o-like image request, print RSS per role in MB (``ps``).

    .venv/bin/python benchmarks/role_rss.py SOURCE_TREE MODEL_DIR DTYPE
    .venv/bin/python benchmarks/role_rss.py . ~/.cache/epd-serve/models/mid-seed0 bfloat16

SOURCE_TREE is a checkout (a ``git worktree`` of an older commit compares before and after);
the environment passes through (``EPD_TRANSFER_BACKEND=mooncake`` and so on). Results of this
session: ``docs/bench/role-rss-mid-bf16.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROLES = ("encoder", "prefill", "decode")
EPD = os.path.join(os.path.dirname(sys.executable), "epd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int) -> bool:
    """The gateway answers ``/health`` and lists an instance of every role."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            counts = json.loads(r.read())["instances"]
    except (OSError, ValueError, KeyError):
        return False
    return all(counts.get(k, 0) >= 1 for k in ROLES)


def rss_mb(root_pid: int) -> dict[str, int]:
    """RSS (MB, ps KiB / 1024) of every ``-m services.<role>`` process under ``root_pid`` (the
    ``epd up`` this script started; other deployments on the machine are not counted), by role."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()[1:]]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    ours, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, []))
    rss = {}
    for pid, _, kib, args in rows:
        for role in (*ROLES, "gateway"):
            if int(pid) in ours and f"-m services.{role}" in args:
                rss[role] = round(int(kib) / 1024)
    return rss


def main() -> None:
    root, model, dtype = sys.argv[1], os.path.expanduser(sys.argv[2]), sys.argv[3]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root), "EPD_DTYPE": dtype, "EPD_RESTART": "no"}
    log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                            f"role-rss-{os.path.basename(os.path.abspath(root))}-{dtype}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "epd.cli", "up", "--topology", "E-P-D", "--port", str(port),
                                 "--model", model], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while not ready(port):
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise SystemExit(f"epd up did not become ready (exit {proc.poll()}); see {log_path}")
            time.sleep(0.25)
        t_ready = time.monotonic() - t0
        bench = subprocess.run([EPD, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
                                "--dataset-name", "sharegpt4o-like", "--num-prompts", "1", "--disable-tqdm"],
                               capture_output=True, text=True)
        ok = [ln.strip() for ln in bench.stdout.splitlines() if "Successful" in ln or "Failed" in ln]
        print(json.dumps({"root": root, "dtype": dtype, "start_to_ready_s": round(t_ready, 1), "request": ok,
                          "rss_mb": rss_mb(proc.pid)}))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


if __name__ == "__main__":
    main()
