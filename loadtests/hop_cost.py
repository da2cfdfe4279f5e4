"""What one message between two processes costs on this machine, before any Python framework runs.

    uv run python -m loadtests.hop_cost                 # 20,000 round trips each way of sending
    uv run python -m loadtests.hop_cost --count 5000

Two processes over TCP loopback (``TCP_NODELAY``, as nats-py, aiohttp and nats-server use it) send a
300-byte message back and forth with blocking sockets and nothing else: no event loop, no parsing. Each
round trip is two one-way hops. Two ways of sending:

- ``one at a time``: the next message leaves only when the answer is back, so every hop wakes a process
  that was asleep. This is leafwire's path at low rates, where each request crosses ten such hops (HTTP in,
  gateway → NATS → router → NATS → cloud-adapter → upstream → cloud-adapter → NATS → gateway → HTTP out).
- ``32 in flight``: the sender keeps 32 messages outstanding, so the receiver is mostly awake and reads
  several per wake-up. This is closer to a busy path at high rates.

CPU is each process's user + system time per one-way hop it sent or received. On a VM a wake-up of another
vCPU's process is an inter-processor interrupt the hypervisor handles, so this floor is much higher than on
bare metal, and it is the same for any code on the path: it is what no change to leafwire can remove.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time

MESSAGE = b"x" * 300


def _echo(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    os._exit(0)


def measure(count: int, in_flight: int) -> dict[str, float]:
    """Round trips with ``in_flight`` messages outstanding: wall µs per round trip, CPU µs per hop each side."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    address = listener.getsockname()
    sys.stdout.flush()  # the child must not print what the parent had buffered
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the echoing child
        _echo(listener)
    listener.close()
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = len(MESSAGE)

    def run(n: int) -> None:
        sent = received = 0  # messages sent, bytes received
        while received < n * size:
            while sent < n and sent - received // size < in_flight:
                sock.sendall(MESSAGE)
                sent += 1
            received += len(sock.recv(65536))

    run(min(1000, count))  # warm up
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    run(count)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)  # one reading each side: user and system time agree
    sys_ = after.ru_stime - before.ru_stime
    cpu = after.ru_utime - before.ru_utime + sys_
    sock.close()
    _, _, usage = os.wait4(pid, 0)
    echo_cpu = usage.ru_utime + usage.ru_stime  # warm-up included: a slight overestimate
    hops = 2 * count
    return {"wall_us": 1e6 * wall / count, "sender_us": 1e6 * cpu / hops, "sender_sys": sys_ / cpu if cpu else 0.0,
            "echo_us": 1e6 * echo_cpu / (2 * (count + min(1000, count)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="round trips per way of sending")
    args = parser.parse_args()
    print("| sending | round trip µs (wall) | sender CPU µs/hop | of it in the kernel | echo CPU µs/hop |")
    print("| --- | --- | --- | --- | --- |")
    for label, in_flight in (("one at a time", 1), ("32 in flight", 32)):
        got = measure(args.count, in_flight)
        print(f"| {label} | {got['wall_us']:.1f} | {got['sender_us']:.1f} | {got['sender_sys']:.0%} "
              f"| {got['echo_us']:.1f} |")


if __name__ == "__main__":
    main()
