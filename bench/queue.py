"""Job-system overhead: JobQueue/JobWorker vs a bare XADD/XREADGROUP/XACK loop on the same Redis.

Throughput: submit N jobs, then drain them (empty handler), in one process; jobs/s = N / (submit
time + drain time), the inverse of the whole per-job cost. Latency: one job in flight at a time, submit ->
the worker has acknowledged it (p50/p99). Both systems run in the same run, alternating over
`--rounds`, against one embedded redis-server (or --redis-url); the ratio is the median of the
rounds' jobs/bare ratios (each pair measured back to back), figures are medians / pooled samples.

    python bench/queue.py                # or: python -m bench.queue
    python bench/queue.py --jobs 500 --latency-jobs 100 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where "queue.py" would shadow the stdlib
# `queue` that redis-py imports: drop that entry and put the repository root first instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench._report import target, write_report  # noqa: E402
from tokenmill.common.jobs import JobQueue, JobWorker  # noqa: E402
from tokenmill.common.platform.redis_embedded import EmbeddedRedis  # noqa: E402
from tokenmill.common.redis_conn import connect_url  # noqa: E402

BARE_STREAM, BARE_GROUP = "bench:bare:stream", "bench:bare:workers"
JOB_TYPE = "bench"


# -- throughput: submit N, then drain N, in one process -------------------------------------------
# Sequential phases instead of concurrent producer/consumer processes: on a shared machine the
# scheduling of three busy processes swamps the difference being measured. jobs/s is
# N / (submit time + drain time), i.e. the inverse of the full per-job cost of the path.
def bare_setup(url: str) -> None:
    r = connect_url(url)
    r.delete(BARE_STREAM)
    r.xgroup_create(BARE_STREAM, BARE_GROUP, id="0", mkstream=True)


def bare_throughput(url: str, n: int) -> float:
    bare_setup(url)
    r = connect_url(url)
    t0 = time.perf_counter()
    for i in range(n):
        r.xadd(BARE_STREAM, {"job": str(i)})
    for _ in range(n):
        reply = r.xreadgroup(BARE_GROUP, "c1", {BARE_STREAM: ">"}, count=1, block=1000)
        r.xack(BARE_STREAM, BARE_GROUP, reply[0][1][0][0])
    return n / (time.perf_counter() - t0)


def jobs_setup(url: str) -> None:
    r = connect_url(url)
    for key in r.scan_iter("tokenmill:*"):
        r.delete(key)


def jobs_throughput(url: str, n: int) -> float:
    """Through the production path: JobQueue.submit, then JobWorker.run() until n outcomes."""
    jobs_setup(url)
    queue = JobQueue(connect_url(url))
    stop, done = threading.Event(), [0]

    def on_finish(job, outcome: str) -> None:
        done[0] += 1
        if done[0] == n:
            stop.set()

    worker = JobWorker(
        JobQueue(connect_url(url)), JOB_TYPE, lambda ctx: {}, consumer="c1", on_finish=on_finish
    )
    t0 = time.perf_counter()
    for i in range(n):
        queue.submit(JOB_TYPE, {"i": i})
    worker.run(stop)
    elapsed = time.perf_counter() - t0
    worker.stop()
    return n / elapsed


# -- latency: one job in flight --------------------------------------------------------------------
def latency_bare(url: str, n: int) -> list[float]:
    bare_setup(url)
    r = connect_url(url)
    acked, stop = threading.Event(), threading.Event()

    def consume() -> None:
        c = connect_url(url)
        while not stop.is_set():
            reply = c.xreadgroup(BARE_GROUP, "c1", {BARE_STREAM: ">"}, count=1, block=200)
            if reply:
                c.xack(BARE_STREAM, BARE_GROUP, reply[0][1][0][0])
                acked.set()

    return _closed_loop(n, lambda i: r.xadd(BARE_STREAM, {"job": str(i)}), consume, acked, stop)


def latency_jobs(url: str, n: int) -> list[float]:
    jobs_setup(url)
    queue = JobQueue(connect_url(url))
    acked, stop = threading.Event(), threading.Event()
    worker = JobWorker(
        JobQueue(connect_url(url)),
        JOB_TYPE,
        lambda ctx: {},
        consumer="c1",
        on_finish=lambda j, o: acked.set(),
    )
    return _closed_loop(n, lambda i: queue.submit(JOB_TYPE, {"i": i}), lambda: worker.run(stop), acked, stop)


def _closed_loop(n, submit, consume, acked: threading.Event, stop: threading.Event) -> list[float]:
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    samples = []
    for i in range(n + 20):
        acked.clear()
        t0 = time.perf_counter()
        submit(i)
        if not acked.wait(10):
            raise RuntimeError("consumer did not acknowledge within 10 s")
        if i >= 20:  # warm-up
            samples.append(time.perf_counter() - t0)
    stop.set()
    thread.join(5)
    return samples


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000 if len(samples) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per throughput round")
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
    args = parser.parse_args(argv)

    server = None
    url = args.redis_url
    if not url:
        server = EmbeddedRedis(tempfile.mkdtemp(prefix="bench-queue-"))
        url = server.start()
    try:
        bare_tp, jobs_tp, bare_lat, jobs_lat = [], [], [], []
        for _ in range(args.rounds):  # alternate so machine noise hits both alike
            bare_tp.append(bare_throughput(url, args.jobs))
            jobs_tp.append(jobs_throughput(url, args.jobs))
            bare_lat.append(latency_bare(url, args.latency_jobs))
            jobs_lat.append(latency_jobs(url, args.latency_jobs))
    finally:
        if server is not None:
            server.stop()

    # Other work on the machine moves both systems' figures between rounds: compare each round's
    # pair (run back to back) and report medians, not the luckiest round of each.
    ratios = [j / b for j, b in zip(jobs_tp, bare_tp, strict=True)]
    jl = [x for run in jobs_lat for x in run]
    bl = [x for run in bare_lat for x in run]
    figures = {
        "jobs_throughput_per_s": statistics.median(jobs_tp),
        "jobs_latency_p50_ms": pct(jl, 50),
        "jobs_latency_p99_ms": pct(jl, 99),
    }
    baseline = {
        "bare_throughput_per_s": statistics.median(bare_tp),
        "bare_latency_p50_ms": pct(bl, 50),
        "bare_latency_p99_ms": pct(bl, 99),
    }
    ratio = statistics.median(ratios)
    write_report(
        "queue",
        figures,
        baseline,
        {"throughput_jobs_over_bare": ratio, "p50_latency_jobs_over_bare": pct(jl, 50) / pct(bl, 50)},
        {"throughput_ratio": target(ratio, 0.5)},
        extra={
            "config": vars(args) | {"redis_url": "embedded" if server else "external"},
            "rounds": {"bare_tp": bare_tp, "jobs_tp": jobs_tp, "ratio": ratios},
            "method": "throughput: submit N then drain N in one process, empty handler; "
            "ratio = median over rounds of jobs/bare measured back to back; latency: one job in flight, "
            "submit -> acknowledged, all rounds pooled",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
