"""What the cloud path costs: gateway → router → cloud-adapter → an upstream that answers at once.

    uv run python -m loadtests.cloud_bench                 # 100, 250, 500, 1000 requests/s, 10 s each
    uv run python -m loadtests.cloud_bench --rates 1000 --duration 30 --stream
    uv run python -m loadtests.cloud_bench --floor         # the same path with do-nothing services

Starts its own nats-server (JetStream), the fake upstream (loadtests/fake_upstream.py), a cloud-adapter,
a router and a gateway, each as its own process. For each rate it sends requests open-loop (at fixed
times, whatever the answers do; latency counts from the time a request was due, so a backlog shows) first
straight to the upstream, then through the gateway, and prints: the achieved rate, errors, p50/p99 of
both paths and what the leafwire path adds, the CPU (share of one core) and RSS of every process, and the
CPU time of all of them together per request (two cores have 2 ms to give each request at 1,000/s), and the
share of the machine's CPU its hypervisor gave to other guests meanwhile ("steal": on a shared VM, a phase
with steal measured the neighbours too).
Then it measures cache hits: the same temperature-0 request, one at a time, answered from NATS KV.
With ``--adapter-alone`` it also drives the cloud-adapter by itself over NATS, the way a router does
(a hand-off on ``lw.v1.bench.cloud.chat``, answer on the ``Lw-Reply`` subject), to separate its share.
Services log at ``warning`` (``--log-level info`` to include per-request log lines). With ``--floor`` the
do-nothing services of ``loadtests/skeleton.py`` stand in for leafwire's (same processes, hops and messages):
the floor of this path on this machine, to compare with.

Every HTTP call goes through ``loadtests/httpload.py`` (keep-alive HTTP/1.1 on asyncio Protocols) and the
upstream is a raw-Protocol server: both share the two cores with the services under test, so the harness is
kept to a few tens of microseconds of CPU a request (aiohttp's client cost ~0.4 ms, aiohttp.web ~0.24 ms),
and requests are paced by a timerfd (``loadtests/pacing.py``) rather than a sleep per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import nats
import psutil
from nats.aio.msg import Msg

from deploy import topology
from deploy.topology import Node, free_port
from loadtests.httpload import HttpPool, Response
from loadtests.pacing import paced
from shared import subjects

ROOT = Path(__file__).resolve().parent.parent
SITE = "bench"
BODY = {"model": "bench/echo", "messages": [{"role": "user", "content": "Say pong."}], "temperature": 0.7}


@dataclass
class Proc:
    """A process of the benchmark, measured by psutil."""

    name: str
    popen: subprocess.Popen[bytes]
    ps: psutil.Process = field(init=False)
    _cpu: float = 0.0
    _at: float = 0.0

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.popen.pid)

    def mark(self) -> None:
        t = self.ps.cpu_times()
        self._cpu, self._at = t.user + t.system, time.monotonic()

    def usage(self) -> tuple[float, float]:
        """(CPU % of one core since ``mark``, RSS MiB now)."""
        t = self.ps.cpu_times()
        cpu = (t.user + t.system - self._cpu) / max(time.monotonic() - self._at, 1e-9) * 100
        return cpu, self.ps.memory_info().rss / 2**20


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextmanager
def stack(tmp: Path, log_level: str, profile: Path | None = None,
          floor: bool = False) -> Iterator[tuple[list[Proc], str, str, str]]:
    """nats-server, fake upstream, cloud-adapter, router, gateway; yields (processes, upstream URL, gateway URL,
    NATS URL).

    With ``profile``, the three services run under cProfile (CPU time, see loadtests/cpu_profile.py) and
    leave ``<service>.prof`` there on exit. With ``floor``, the skeleton services of loadtests/skeleton.py
    stand in for leafwire's."""
    procs: list[Proc] = []
    client, monitor, up_port, gw_port = free_port(), free_port(), free_port(), free_port()
    conf = tmp / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n'
                    f'jetstream {{ store_dir: "{tmp / "js"}" }}\nmax_payload: 8MB\n')
    node = Node("bench", conf, "127.0.0.1", client, monitor)
    providers = tmp / "providers.yaml"
    providers.write_text(json.dumps({"providers": [{
        "name": "bench", "kind": "openai-compatible", "base_url": f"http://127.0.0.1:{up_port}/v1", "local": True,
        "max_concurrent": 4096, "models": {"echo": {}}}]}))
    policy = tmp / "policy.yaml"
    policy.write_text("last_resort: none\n")  # measure the cloud path alone: no local fallback
    env = {**os.environ, "LW_NATS_URL": node.url, "LW_SITE": SITE, "LW_LOG_LEVEL": log_level,
           "LW_PROVIDERS_FILE": str(providers), "PYTHONUNBUFFERED": "1",
           # a site without a hub: its uplink is up by configuration
           "LW_ROUTER_UPLINK": "up", "LW_ROUTER_POLICY_FILE": str(policy)}
    logs = tmp / "logs"
    logs.mkdir()

    def start(name: str, cmd: list[str], extra: dict[str, str]) -> Proc:
        out = (logs / f"{name}.log").open("wb")
        p = Proc(name, subprocess.Popen(cmd, env={**env, **extra}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
        procs.append(p)
        return p

    try:
        start("nats-server", node.command(), {})
        topology.wait_healthy([node], procs=[procs[0].popen])
        start("upstream", [sys.executable, "-m", "loadtests.fake_upstream", "--port", str(up_port)], {})
        if floor:
            skeleton = [sys.executable, "-m", "loadtests.skeleton"]
            start("cloud-adapter", [*skeleton, "adapter", "--nats", node.url,
                                    "--upstream", f"http://127.0.0.1:{up_port}/v1/chat/completions"], {})
            start("router", [*skeleton, "router", "--nats", node.url], {})
            start("gateway", [*skeleton, "gateway", "--nats", node.url, "--port", str(gw_port)], {})
            wait_http(f"http://127.0.0.1:{gw_port}/readyz")
            yield procs, f"http://127.0.0.1:{up_port}/v1/chat/completions", \
                f"http://127.0.0.1:{gw_port}/v1/chat/completions", node.url
            return
        ops = {}

        def command(service: str) -> list[str]:
            prof = ["-m", "loadtests.cpu_profile", str(profile / f"{service}.prof")] if profile else []
            return [sys.executable, *prof, *([] if profile else ["-m"]), f"services.{service}"]

        for service in ("cloud_adapter", "router"):
            ops[service] = free_port()
            start(service.replace("_", "-"), command(service), {"LW_OPS_PORT": str(ops[service])})
            wait_http(f"http://127.0.0.1:{ops[service]}/readyz")
        start("gateway", command("gateway"), {"LW_GATEWAY_PORT": str(gw_port)})
        wait_http(f"http://127.0.0.1:{gw_port}/readyz")
        yield procs, f"http://127.0.0.1:{up_port}/v1/chat/completions", \
            f"http://127.0.0.1:{gw_port}/v1/chat/completions", node.url
    finally:
        # One at a time, newest first: a service drains its NATS connection (and, under --profile, writes
        # its profile) while nats-server is still there.
        for p in reversed(procs):
            p.popen.terminate()
            try:
                p.popen.wait(15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)


@dataclass
class Phase:
    """One open-loop run."""

    rate: float
    duration: float
    latencies: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # due times (s into the phase), as latencies
    errors: int = 0
    sent: int = 0
    elapsed: float = 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def achieved(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


async def open_loop(pool: HttpPool, url: str, body: bytes, rate: float, duration: float) -> Phase:
    """Send ``rate`` requests a second for ``duration`` seconds at fixed times; latency from the due time.

    Each request is a Future from ``HttpPool.submit`` with a done callback, not a Task, fired by
    ``loadtests.pacing.paced`` (a timerfd, not a sleep per request): the load generator shares the cores
    with the system under test, so it does as little per request as it can. A request counts as answered
    once its whole body is read (for a stream, up to the last chunk); any exception or a status other than
    200 is an error. Times come from ``perf_counter``: uvloop's ``loop.time()`` only has millisecond
    resolution."""
    clock = time.perf_counter
    phase = Phase(rate, duration)
    path = urlsplit(url).path
    latencies, answered_at = phase.latencies, phase.answered_at
    all_answered = asyncio.get_running_loop().create_future()
    total = int(rate * duration)
    left = total

    def answered(due: float, future: asyncio.Future[Response]) -> None:
        nonlocal left
        if not future.cancelled() and future.exception() is None and future.result()[0] == 200:
            latencies.append(clock() - due)
            answered_at.append(due - start)
        else:
            phase.errors += 1
        left -= 1
        if not left and not all_answered.done():
            all_answered.set_result(None)

    def fire(due: float) -> None:
        pool.submit(path, body).add_done_callback(partial(answered, due))
        phase.sent += 1

    start = clock() + 0.05
    await paced(start, rate, total, fire)
    if total:
        await all_answered
    phase.elapsed = clock() - start
    return phase


async def one_at_a_time(pool: HttpPool, url: str, body: bytes, count: int, *, cache_hit: bool) -> list[float]:
    """Latencies (s) of ``count`` requests sent one after the other; with ``cache_hit`` the cache header
    must say hit."""
    path = urlsplit(url).path
    out = []
    for _ in range(count):
        t = time.perf_counter()
        status, headers, _ = await pool.post(path, body)
        out.append(time.perf_counter() - t)
        if status != 200 or (cache_hit and headers.get("x-leafwire-cache") != "hit"):
            raise RuntimeError(f"expected {'a cache hit' if cache_hit else 200}, got {status} "
                               f"{headers.get('x-leafwire-cache')}")
    return out


async def adapter_alone(nats_url: str, body: bytes, args: argparse.Namespace, adapter: Proc) -> None:
    """Open-loop requests straight to the cloud-adapter over NATS, as a router sends them."""
    nc = await nats.connect(nats_url)
    inbox, admissions = nc.new_inbox(), nc.new_inbox()
    due: dict[str, float] = {}
    done: list[float] = []
    errors = 0
    sent_all, answered_all = False, asyncio.Event()

    async def on_answer(msg: Msg) -> None:
        nonlocal errors
        event = (msg.headers or {}).get("Lw-Event")
        if event in ("result", "done", "error"):
            started = due.pop(msg.subject.rsplit(".", 1)[1], None)
            if started is not None:
                done.append(time.perf_counter() - started)
            errors += event == "error"
            if sent_all and not due:
                answered_all.set()

    async def ignore(msg: Msg) -> None:
        return None

    await nc.subscribe(f"{inbox}.*", cb=on_answer)
    await nc.subscribe(f"{admissions}.*", cb=ignore)
    await nc.flush()
    print("\ncloud-adapter alone, driven over NATS as a router drives it (answer latency from the due time):\n")
    print(fmt_row(["rate/s", "answered/s", "errors", "p50 ms", "p99 ms", "adapter CPU %", "adapter CPU ms/request"]))
    print(fmt_row(["---"] * 7))
    for rate in args.rates:
        done.clear()
        errors = 0
        sent_all = False
        answered_all.clear()
        adapter.mark()
        start = time.perf_counter() + 0.05
        total = int(rate * args.duration)
        for i in range(total):
            at = start + i / rate
            if (wait := at - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            key = f"{rate:g}-{i}"
            due[key] = at
            await nc.publish(subjects.cloud_chat(SITE), body, reply=f"{admissions}.{key}",
                             headers={"Lw-Reply": f"{inbox}.{key}", "Lw-Request-Id": uuid.uuid4().hex,
                                      "Lw-Deadline": f"{time.time() + 30:.3f}", "Lw-Handoff": "1"})
        sent_all = True
        if due:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await answered_all.wait()
        elapsed = time.perf_counter() - start
        cpu, _ = adapter.usage()
        ordered = sorted(done)
        p50 = ordered[len(ordered) // 2] * 1000 if ordered else float("nan")
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else float("nan")
        print(fmt_row([f"{rate:g}", f"{len(done) / elapsed:.0f}", str(errors + len(due)), f"{p50:.2f}", f"{p99:.2f}",
                       f"{cpu:.0f}", f"{cpu * 10 / max(len(done) / elapsed, 1e-9):.2f}"]), flush=True)
        due.clear()
    await nc.drain()


def cpu_ticks() -> tuple[int, int]:
    """The machine's (steal, total) CPU ticks so far, from /proc/stat ((0, 0) where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user and nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> str:
    """The share of the machine's CPU time that its hypervisor gave to others between two readings."""
    total = after[1] - before[1]
    return f"{(after[0] - before[0]) * 100 / total:.0f}" if total > 0 else "n/a"


def fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


async def run(args: argparse.Namespace) -> None:
    body = dict(BODY, stream=True) if args.stream else dict(BODY)
    raw = json.dumps(body).encode()
    me = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp, \
            stack(Path(tmp), args.log_level, args.profile, args.floor) as (procs, up, gw, nats_url):
        up_pool = await HttpPool.open(up, limit=2000, request_timeout=30)
        gw_pool = await HttpPool.open(gw, limit=2000, request_timeout=30)
        try:
            await open_loop(gw_pool, gw, raw, 100, args.warmup)  # warm connections, caches, JIT-free paths
            await open_loop(up_pool, up, raw, 100, 1)
            if args.floor:
                print("skeleton services (loadtests/skeleton.py) in place of leafwire's: the floor of this path")
            print(f"load before: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} CPUs; "
                  f"{'streamed' if args.stream else 'non-streamed'} requests; {args.duration:g} s per phase\n")
            header = ["rate/s", "achieved/s", "errors", "direct p50/p99 ms", "leafwire p50/p99 ms",
                      "added p50/p99 ms", *[f"{p.name} CPU% / MiB" for p in procs], "loadgen CPU%",
                      "CPU ms/request (all)", "steal %"]
            rows = []
            for rate in args.rates:
                direct = await open_loop(up_pool, up, raw, rate, args.duration)
                for p in procs:
                    p.mark()
                c0, t0 = me.cpu_times(), cpu_ticks()
                via = await open_loop(gw_pool, gw, raw, rate, args.duration)
                c1, t1 = me.cpu_times(), cpu_ticks()
                usage = [p.usage() for p in procs]
                gen = (c1.user + c1.system - c0.user - c0.system) / via.elapsed * 100
                every = (sum(cpu for cpu, _ in usage) + gen) * 10 / max(via.achieved, 1e-9)  # % of a core -> ms/s
                rows.append(fmt_row([
                    f"{rate:g}", f"{via.achieved:.0f}", f"{via.sent - len(via.latencies)}",
                    f"{direct.pct(0.5):.2f} / {direct.pct(0.99):.2f}", f"{via.pct(0.5):.2f} / {via.pct(0.99):.2f}",
                    f"{via.pct(0.5) - direct.pct(0.5):.2f} / {via.pct(0.99) - direct.pct(0.99):.2f}",
                    *[f"{cpu:.0f} / {rss:.0f}" for cpu, rss in usage], f"{gen:.0f}", f"{every:.2f}",
                    steal_share(t0, t1)]))
                print(rows[-1], flush=True)
                if args.timeline:
                    args.timeline.mkdir(parents=True, exist_ok=True)
                    (args.timeline / f"{rate:g}.csv").write_text("due_s,latency_ms\n" + "".join(
                        f"{d:.6f},{lat * 1000:.3f}\n" for d, lat in zip(via.answered_at, via.latencies, strict=True)))
            print()
            print(fmt_row(header))
            print(fmt_row(["---"] * len(header)))
            print("\n".join(rows))
            if args.floor:  # the skeleton has no cache
                print(f"load after: {os.getloadavg()[0]:.2f}")
                return
            cached = json.dumps({**BODY, "temperature": 0, "messages": [{"role": "user", "content": "cache bench"}]})
            await gw_pool.post(urlsplit(gw).path, cached.encode())  # the miss that stores it
            t0 = cpu_ticks()
            hits = await one_at_a_time(gw_pool, gw, cached.encode(), args.cache_requests, cache_hit=True)
            t1 = cpu_ticks()
            direct_seq = await one_at_a_time(up_pool, up, raw, args.cache_requests, cache_hit=False)
            q = statistics.quantiles(hits, n=100)
            print(f"\ncache hit, end to end through the gateway, one at a time ({len(hits)} requests): "
                  f"p50 {statistics.median(hits) * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms, steal "
                  f"{steal_share(t0, t1)}% (the upstream called directly: p50 "
                  f"{statistics.median(direct_seq) * 1000:.2f} ms)")
            if args.adapter_alone:
                await adapter_alone(nats_url, raw, args, next(p for p in procs if p.name == "cloud-adapter"))
            print(f"load after: {os.getloadavg()[0]:.2f}")
        finally:
            await gw_pool.close()
            await up_pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--stream", action="store_true", help="streamed requests (SSE) instead of whole answers")
    parser.add_argument("--cache-requests", type=int, default=500)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--adapter-alone", action="store_true",
                        help="also drive the cloud-adapter by itself over NATS at the same rates")
    parser.add_argument("--timeline", type=Path,
                        help="write <rate>.csv here: each answered request's due time and latency, to find stalls")
    parser.add_argument("--profile", type=Path, help="run the services under cProfile, writing <service>.prof here")
    parser.add_argument("--floor", action="store_true",
                        help="run loadtests/skeleton.py's do-nothing services instead of leafwire's: the floor of "
                             "this path on this machine")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
