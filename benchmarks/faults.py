"""Fault outcomes and recovery times of a running deployment (issue: failures disaggregation
multiplies). Starts ``epd up`` (its supervisor restarts what is killed) with the default
heartbeat TTL unless told otherwise, injects each fault, and measures what a client sees.

Scenarios (each on a settled deployment; the killed process is restarted by the supervisor):

- ``kill9-<role>-2x``: 2 instances of the role, the request waiting on the victim (SIGSTOP,
  then kill -9) before its first token → time from the kill to the response; retried?
- ``kill9-decode-midstream-2x``: decode killed after 6 streamed tokens → the longest gap in the
  stream and whether the result equals the same request's fault-free output (greedy);
- ``kill9-<role>-1x``: one instance of each role (a second deployment) → time to the outcome;
- ``dead-instance-tail``: TTFT/TPOT p50/p99 of a fixed load with every instance alive, then
  with one decode dead (``EPD_RESTART=no``; measured once the registry dropped it);
- ``oversized-text``: a 60 MB text body → time to the 400;
- ``--soak-minutes M``: 64 clients for M minutes while one instance of each role is killed
  in turn every ``--soak-kill-every-s`` seconds → requests served / failed cleanly / lost,
  RSS growth of the processes never killed, KV blocks and buffers free at the end.

    .venv/bin/python benchmarks/faults.py --out benchmarks/results/faults.json
    .venv/bin/python benchmarks/faults.py --only soak --soak-minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd.launcher import ensure_model, free_port, gateway_ready  # noqa: E402
from epd.registry.registry import Registry  # noqa: E402
from tests.e2e.chaos import ClientRequest, instance, leaks, wait_for  # noqa: E402
from tests.e2e.http import user_message  # noqa: E402

TEXT = "Tell me something about the garden in spring."


class Deployment:
    """``epd up --topology T`` with its own embedded-free Redis (a redis-server we start)."""

    def __init__(self, topology: str, model: Path, env: dict[str, str], log: Path) -> None:
        from tests.conftest import start_redis

        self.redis_port = free_port()
        self.redis = start_redis(self.redis_port, log.parent)
        self.url_redis = f"redis://127.0.0.1:{self.redis_port}/0"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        full_env = {**os.environ, "EPD_MODEL": str(model), "EPD_GATEWAY_PORT": str(port), "EPD_TOPOLOGY": topology,
                    "EPD_REDIS_URL": self.url_redis, "EPD_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "epd.cli", "up"], cwd=ROOT, env=full_env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.registry = Registry(self.url_redis)
        self.log = log
        from epd.topology import parse_topology

        topo = parse_topology(topology)
        self.want = {r: topo.count(r) for r in ("encoder", "prefill", "decode")}
        wait_for(lambda: gateway_ready(self.url, self.want), 240, what=f"epd up {topology}")

    def settle(self) -> None:
        wait_for(lambda: gateway_ready(self.url, self.want) and not leaks(self.registry), 60,
                 what="a settled deployment")
        time.sleep(1.0)  # the gateway's view catches up: idle loads, ties broken by instance id

    def pid(self, instance_id: str) -> int:
        return instance(self.registry, instance_id).pid

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(120)
        self.redis.kill()
        self.redis.wait()
        return code


def chat(images: list, text: str, n: int, stream: bool = False) -> dict:
    return {"messages": user_message(images, text), "max_tokens": n, "temperature": 0, "return_token_ids": True,
            "stream": stream}


def photo(i: int):
    from PIL import Image
    from skimage import data

    base = Image.fromarray(data.chelsea())
    return base.crop((i * 7 % 150, i * 5 % 150, i * 7 % 150 + 300, i * 5 % 150 + 280))


def kill_before_first_token(dep: Deployment, role: str, image) -> dict:
    """SIGSTOP the instance the request will wait on, send it, kill -9: time to the outcome."""
    dep.settle()
    victim = f"{role}-0"
    pid = dep.pid(victim)
    os.kill(pid, signal.SIGSTOP)
    req = ClientRequest(f"{dep.url}/v1/chat/completions", chat([image], "Describe it.", 12))
    time.sleep(1.0)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    out = req.result(180)
    retried = "retry" in _lines(dep, out.rid)
    # the supervisor restarts it: wait for the new process, so the next scenario starts whole
    wait_for(lambda: (i := instance(dep.registry, victim)) and i.pid != pid, 120, what=f"{victim} restarted")
    return {"status": out.status, "error": (out.error or {}).get("type"), "seconds": round(out.t_end - t_kill, 2),
            "retried": retried, "outcome": "served" if out.status == 200 else f"error {out.status}"}


def _lines(dep: Deployment, rid: str) -> str:
    return "\n".join(ln for ln in dep.log.read_text(errors="replace").splitlines() if rid and rid in ln)


def kill_decode_midstream(dep: Deployment, n: int = 120, streams: int = 8) -> dict:
    """``streams`` concurrent greedy streams; once each has 6 tokens the decode holding the most
    is killed. Counts the victim's streams that completed token-exact (vs their fault-free run)."""
    dep.settle()
    prompts = [f"{TEXT} ({k})" for k in range(streams)]
    reference = [ClientRequest(f"{dep.url}/v1/chat/completions", chat([], p, n)).result(120).token_ids
                 for p in prompts]
    dep.settle()
    reqs = [ClientRequest(f"{dep.url}/v1/chat/completions", chat([], p, n, stream=True), after_tokens=6)
            for p in prompts]
    for r in reqs:
        r.first_tokens.wait(60)
    log = dep.log.read_text(errors="replace").splitlines()
    holder = {r.out.rid: next(ln for ln in log if f"request {r.out.rid}: route" in ln).rsplit("decode ", 1)[1].strip()
              for r in reqs}
    victim = max(set(holder.values()), key=list(holder.values()).count)
    pid = dep.pid(victim)
    os.kill(pid, signal.SIGSTOP)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    outs = [r.result(180) for r in reqs]
    wait_for(lambda: (i := instance(dep.registry, victim)) and i.pid != pid, 120, what=f"{victim} restarted")
    on_victim = [(o, ref) for o, ref in zip(outs, reference, strict=True) if holder[o.rid] == victim]
    exact = [o for o, ref in on_victim if o.error is None and o.done and o.token_ids == ref]
    gaps = [next((t for t in o.chunk_times if t > t_kill), t_kill) - t_kill for o, _ in on_victim]
    return {"streams": streams, "on_victim": len(on_victim), "completed_token_exact": len(exact),
            "migrated": sum("migration as" in _lines(dep, o.rid) for o, _ in on_victim),
            "others_unaffected": all(o.error is None and o.token_ids == ref
                                     for o, ref in zip(outs, reference, strict=True) if holder[o.rid] != victim),
            "seconds": round(max(gaps), 2) if gaps else None,
            "outcome": f"{len(exact)}/{len(on_victim)} migrated streams token-exact"}


def load_percentiles(dep: Deployment, requests: int, concurrency: int) -> dict:
    """TTFT and TPOT percentiles (ms) of ``requests`` streamed text requests, ``concurrency`` at a time."""
    ttft, tpot = [], []
    pending = list(range(requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                pending.pop()
            out = ClientRequest(f"{dep.url}/v1/chat/completions", chat([], TEXT, 32, stream=True)).result(120)
            if out.status == 200 and len(out.chunk_times) > 1:
                ttft.append((out.chunk_times[0] - out.t_start) * 1e3)
                tpot.append((out.chunk_times[-1] - out.chunk_times[0]) / (len(out.chunk_times) - 1) * 1e3)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1], 1) if len(xs) > 2 else None

    return {"n": len(ttft), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}


def oversized(dep: Deployment) -> dict:
    import urllib.error
    import urllib.request

    body = json.dumps(chat([], "lorem ipsum " * (5 << 20), 4)).encode()
    t0 = time.monotonic()
    try:
        urllib.request.urlopen(urllib.request.Request(f"{dep.url}/v1/chat/completions", data=body,
                                                      headers={"Content-Type": "application/json"}), timeout=300)
        status = 200
    except urllib.error.HTTPError as err:
        status = err.code
    return {"bytes": len(body), "status": status, "seconds": round(time.monotonic() - t0, 3)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(dep: Deployment, minutes: float, kill_every_s: float, clients: int = 64) -> dict:
    """``clients`` closed-loop clients for ``minutes``; one instance killed every ``kill_every_s``."""
    stop_at = time.monotonic() + minutes * 60
    counts = {"served": 0, "clean_error": 0, "lost": 0}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    images = [photo(i) for i in range(8)]

    def client(i: int):
        r = random.Random(i)
        while time.monotonic() < stop_at:
            imgs = [images[r.randrange(8)]] if r.random() < 0.5 else []
            out = ClientRequest(f"{dep.url}/v1/chat/completions", chat(imgs, TEXT, 16, stream=bool(i % 2)),
                                timeout=150).result(200)
            ok = out.status == 200 and out.error is None and out.done
            with lock:
                if ok:
                    counts["served"] += 1
                elif out.error and out.error.get("type") != "connection":
                    counts["clean_error"] += 1
                    errors[out.error.get("type", "?")] = errors.get(out.error.get("type", "?"), 0) + 1
                else:
                    counts["lost"] += 1

    never_killed = {i.instance_id: i.pid for i in dep.registry.instances() if i.instance_id.endswith("-1")}
    gw_pid = next(i.pid for i in dep.registry.instances() if "gateway" in i.roles)
    never_killed["gateway"] = gw_pid
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(30.0, kill_every_s / 2))  # warmed up
    rss_start = {k: rss_mb(p) for k, p in never_killed.items()}
    kills = []
    roles = ["encoder", "prefill", "decode"]
    while time.monotonic() + kill_every_s < stop_at:
        time.sleep(kill_every_s)
        victim = f"{roles[len(kills) % 3]}-0"
        info = instance(dep.registry, victim)
        if info is not None:
            os.kill(info.pid, signal.SIGKILL)
            kills.append(victim)
    for t in threads:
        t.join(300)
    rss_end = {k: rss_mb(p) for k, p in never_killed.items()}
    time.sleep(2)
    dep.settle()
    growth = {k: round((rss_end[k] - rss_start[k]) / rss_start[k] * 100, 1) for k in rss_start if rss_start[k]}
    return {"minutes": minutes, "clients": clients, "kills": kills, **counts, "clean_error_types": errors,
            "rss_growth_pct": growth, "leaks_at_end": leaks(dep.registry)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model directory (default: the tiny preset)")
    ap.add_argument("--ttl", type=float, default=5.0, help="EPD_INSTANCE_TTL_S (default 5, the product default)")
    ap.add_argument("--only", default="", help="comma list: kills,midstream,single,tail,oversized,soak")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams in the mid-stream decode kill")
    ap.add_argument("--soak-minutes", type=float, default=0.0)
    ap.add_argument("--soak-kill-every-s", type=float, default=120.0)
    ap.add_argument("--workdir", default="/tmp/epd-faults")
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    args = ap.parse_args()
    model = ensure_model(args.model)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else {"kills", "midstream", "single", "tail", "oversized"}
    if args.soak_minutes:
        only.add("soak")
    env = {"EPD_INSTANCE_TTL_S": str(args.ttl), "EPD_RESTART_BACKOFF_S": "1"}
    results: dict = {"ttl_s": args.ttl, "target_s": 2 * args.ttl, "scenarios": {}}
    rows = results["scenarios"]
    if only & {"kills", "midstream", "tail", "oversized", "soak"}:
        dep = Deployment("2E-2P-2D", model, env, work / "up-2x.log")
        try:
            if "kills" in only:
                for k, role in enumerate(("encoder", "prefill", "decode")):
                    rows[f"kill9-{role}-2x"] = kill_before_first_token(dep, role, photo(20 + k))
            if "midstream" in only:
                rows["kill9-decode-midstream-2x"] = kill_decode_midstream(dep, streams=args.streams)
            if "oversized" in only:
                rows["oversized-text"] = oversized(dep)
            if "soak" in only:
                rows["soak"] = soak(dep, args.soak_minutes, args.soak_kill_every_s)
        finally:
            dep.stop()
    if "tail" in only:
        dep = Deployment("2E-2P-2D", model, {**env, "EPD_RESTART": "no"}, work / "up-tail.log")
        try:
            dep.settle()
            healthy = load_percentiles(dep, 60, 4)
            os.kill(dep.pid("decode-0"), signal.SIGKILL)
            wait_for(lambda: instance(dep.registry, "decode-0") is None, 60, what="decode-0 to expire")
            time.sleep(3 * 0.5 + 1)  # past the gateway's grace
            degraded = load_percentiles(dep, 60, 4)
            rows["dead-instance-tail"] = {"all_alive": healthy, "one_decode_dead": degraded}
        finally:
            dep.stop()
    if "single" in only:
        dep = Deployment("E-P-D", model, env, work / "up-1x.log")
        try:
            for k, role in enumerate(("encoder", "prefill", "decode")):
                rows[f"kill9-{role}-1x"] = kill_before_first_token(dep, role, photo(40 + k))
        finally:
            dep.stop()
    print(f"\nheartbeat TTL {args.ttl:g} s (target: a clean outcome within 2 x TTL = {2 * args.ttl:g} s)")
    print(f"{'fault':34} {'client outcome':38} {'seconds':>8}")
    for name, row in rows.items():
        if "seconds" in row:
            outcome = row.get("outcome", f"HTTP {row.get('status')}")
            if "retried" in row:
                outcome += " (retried)" if row["retried"] else ""
            print(f"{name:34} {outcome:38} {row['seconds']!s:>8}")
        else:
            print(f"{name:34} {json.dumps(row)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
