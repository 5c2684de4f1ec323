"""Load on `palr serve`: N requests at C concurrent over loopback (httpx), errors, p50/p99 latency, requests/s.

Starts `palr serve` as a subprocess once per setting of ``--max-concurrent`` (the service's compute slots; the
first setting is the default 4, the others are the baselines measured in the same run), waits for /health, sends
``POST /recommend {"user": ID, "k": 10}`` for known users in turn, and prints one markdown row per setting.
With ``--slow-clients N`` it then opens N sockets that each send the headers of an authorised ``POST /recommend``
with ``Content-Length: 100`` and one byte of body, and stop; and times one authorised request while they are open
(issue 18: before the fix, 68 such sockets made every endpoint answer 503).

    PALR_DATA_DIR=../shared/data python benchmarks/service_load.py --run runs/demo/palr \\
        --requests 1000 --concurrency 32 --slots 4 32 --slow-clients 80 --out /tmp/service_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(run: str, port: int, slots: int, queue: int, data_dir: str | None, token: str | None,
                  log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "palr.cli", "serve", "--run", run, "--port", str(port), "--max-concurrent",
           str(slots), "--max-queue", str(queue)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = {**os.environ, **({"PALR_TOKEN": token} if token else {})}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"palr serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"palr serve did not answer /health within 300 s; see {log}")


async def load(base: str, users: list[str], n: int, concurrency: int, k: int, explain: bool,
               token: str | None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    codes: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120, headers=headers) as client:
        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recommend", json={"user": users[i % len(users)], "k": k,
                                                              "explain": explain})
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                lat.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1

        await one(0)  # warm-up, not counted
        lat.clear()
        codes.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(1, n + 1)))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"requests": n, "concurrency": concurrency, "errors": n - codes.get("200", 0), "codes": codes,
            "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1)}


def slow_clients(base: str, n: int, user: str, token: str | None) -> dict[str, Any]:
    """N idle sockets holding half-sent POST /recommend bodies; then one authorised request, timed."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST /recommend HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{").encode()
    idle = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(head)
            idle.append(s)
        time.sleep(0.5)  # let the server take them all in before the timed request
        hdr = {"authorization": f"Bearer {token}"} if token else {}
        slots = httpx.get(f"{base}/health", timeout=30).json().get("slots")
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{base}/recommend", json={"user": user, "k": 10}, headers=hdr, timeout=60)
            code: int | str = r.status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        took = time.perf_counter() - t0
        items = httpx.get(f"{base}/items", params={"q": "a"}, headers=hdr, timeout=60).status_code
    finally:
        for s in idle:
            s.close()
    return {"slow_clients": n, "slow_client_status": code, "slow_client_ms": round(took * 1000, 1),
            "slow_client_items_status": items, "slots_with_idle_clients": slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="A PALR run directory.")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, nargs="+", default=[4, 32], help="--max-concurrent settings to measure.")
    ap.add_argument("--queue", type=int, default=64, help="--max-queue of the service.")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--token", default="bench-token", help="Served with this token ('' = none).")
    ap.add_argument("--slow-clients", type=int, default=0,
                    help="Then time one request while this many idle half-sent POST bodies are open.")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    token = args.token or None
    rows = []
    for slots in args.slots:
        port = free_port()
        proc = start_service(args.run, port, slots, args.queue, args.data_dir, token,
                             Path(f"/tmp/service_load_{port}.log"))
        try:
            base = f"http://127.0.0.1:{port}"
            hdr = {"authorization": f"Bearer {token}"} if token else {}
            users = httpx.get(f"{base}/users", params={"limit": 1000}, headers=hdr).json()["users"]
            res = asyncio.run(load(base, users, args.requests, args.concurrency, args.k, args.explain, token))
            if args.slow_clients:
                res |= slow_clients(base, args.slow_clients, users[0], token)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        res |= {"max_concurrent": slots, "max_queue": args.queue, "k": args.k, "explain": args.explain}
        rows.append(res)
        print(f"| {slots} | {res['requests']} | {res['concurrency']} | {res['errors']} | {res['requests_per_s']} | "
              f"{res['p50_ms']} | {res['p99_ms']} | {res['max_ms']} |" +
              (f" {res['slow_clients']} idle: {res['slow_client_status']} in {res['slow_client_ms']} ms |"
               if args.slow_clients else ""), flush=True)
    doc = {"run": args.run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "results": rows}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
