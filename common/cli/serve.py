"""`tokenmill serve MODEL[:TAG] --replicas N`, `tokenmill generate "prompt" --stream`, `tokenmill bench serve`.

`serve` adds N replica processes of a model to the running platform (`tokenmill up`), beside the
other served models, and waits until each answers SERVING (a real forward pass succeeded) or
reports through the router why it cannot load; the router then routes to them by model. `generate` talks to the router. `bench serve` is a load generator in the
spirit of `vllm bench serve`: concurrent streams, throughput, TTFT and inter-token latency.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import click

from tokenmill.common import errors

if TYPE_CHECKING:
    from tokenmill.common.platform.launcher import ProcessSpec
    from tokenmill.common.platform.replicas import ReplicaOptions

POLL_S = 0.5


def _fail(exc: errors.TokenmillError) -> click.ClickException:
    return click.ClickException(f"{exc.code}: {exc.message}")


@click.command()
@click.argument("model", required=False, default="")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--remove", is_flag=True, help="stop serving MODEL (every version of it)")
@click.option("--list", "list_models", is_flag=True, help="list the served models and their replicas")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto")
@click.option(
    "--kv-cache-mb",
    type=click.FloatRange(0.0, min_open=True),
    default=256.0,
    show_default=True,
    help="KV-cache budget per replica",
)
@click.option(
    "--gpu-memory-utilization",
    type=click.FloatRange(0.0, 0.99),
    default=0.0,
    help="on GPU: KV cache sized to this fraction of GPU memory (overrides --kv-cache-mb)",
)
@click.option("--max-num-seqs", type=click.IntRange(1), default=64, show_default=True)
@click.option("--adapter", "adapters", multiple=True, help="LoRA adapter ref to preload (repeatable)")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds to wait for SERVING")
@click.pass_obj
def serve(
    obj: Any,
    model: str,
    replicas: int,
    remove: bool,
    list_models: bool,
    device: str,
    kv_cache_mb: float,
    gpu_memory_utilization: float,
    max_num_seqs: int,
    adapters: tuple[str, ...],
    timeout: float,
) -> None:
    """Serve MODEL[:VERSION|TAG] from the checkpoint store on N replicas behind the router.

    Other served models keep running. Serving a model that is already served replaces its replicas
    without dropping a request: the new ones start, and the old ones drain once the new are SERVING.
    `--remove MODEL` stops serving it; `--list` shows what is served."""
    from tokenmill.common.platform.replicas import ReplicaOptions

    if list_models:
        _list_served(obj.config)
        return
    if not model:
        raise click.UsageError("give MODEL (or --list)")
    if remove:
        _remove(obj.config, model)
        return
    options = ReplicaOptions(device, kv_cache_mb, gpu_memory_utilization, max_num_seqs, adapters)
    _serve(obj, model, replicas, options, timeout)


def _list_served(config: Any) -> None:
    from tokenmill.common.platform.launcher import RunDir, health_status
    from tokenmill.common.platform.replicas import is_replica, served_model

    run_dir = RunDir(config.data_dir)
    rows = [s for s in run_dir.read_processes() if is_replica(s)]
    if rows and run_dir.supervisor_running() is None:
        click.echo(f"warning: {_UNSUPERVISED}", err=True)
    if not rows:
        click.echo("no model is served; serve one with 'tokenmill serve MODEL'")
        return
    for spec in sorted(rows, key=lambda s: s.name):
        health = health_status(config, spec.health_address)
        click.echo(f"{served_model(spec):<32} {spec.name:<40} {spec.health_address:<22} {health}")


def _remove(config: Any, model: str) -> None:
    from tokenmill.common.platform.launcher import RunDir, remove_processes
    from tokenmill.common.platform.replicas import model_name, replicas_of

    run_dir = RunDir(config.data_dir)
    old = replicas_of(run_dir.read_processes(), model_name(model))
    if not old:
        raise click.ClickException(f"{model} is not served; see 'tokenmill serve --list'")
    if run_dir.supervisor_running() is None and set(run_dir.orphans()) & {s.name for s in old}:
        raise click.ClickException(f"cannot stop serving {model_name(model)}: {_UNSUPERVISED}")
    remove_processes(config, [s.name for s in old])
    _forget_stopped(config, old)
    click.echo(f"stopped serving {model_name(model)} ({len(old)} replica(s) draining)")


_UNSUPERVISED = (
    "the platform's supervisor is not running (killed?): its replicas still serve, but none is "
    "restarted, added or stopped; run 'tokenmill up' to take them back"
)


def _forget_stopped(config: Any, stopped: list[ProcessSpec], keep: str = "") -> None:
    """Drop from the models the router knows (dispatch/registry.py MODELS) what the `stopped`
    replicas served and no replica left in the table serves: their model's versions but `keep` (the
    one a replacement serves now) and the adapters they preloaded. A request for one is then
    NOT_FOUND once they drained, rather than queued for a replica that never comes. Best effort: a
    Redis out of reach only leaves them known."""
    import redis

    from tokenmill.common.cli.platform import _running_redis
    from tokenmill.common.platform.launcher import RunDir
    from tokenmill.common.platform.replicas import is_replica, model_name, served_names

    still = {n for s in RunDir(config.data_dir).read_processes() if is_replica(s) for n in served_names(s)}
    gone = {n for s in stopped for n in served_names(s)}
    base = {model_name(keep)} if keep else set()

    def forget(ref: str) -> bool:
        name = model_name(ref)
        return name in gone and ref != keep and (name not in still or name in base)

    try:
        r = _running_redis(config)
        refs = [ref for ref in r.hkeys(MODELS_HASH) if forget(ref)]
        if refs:
            r.hdel(MODELS_HASH, *refs)
    except (redis.RedisError, RuntimeError, OSError) as exc:
        click.echo(f"warning: could not drop {sorted(gone)} from the served models in Redis: {exc}", err=True)


def _serve(obj: Any, model: str, replicas: int, options: ReplicaOptions, timeout: float) -> None:
    from tokenmill.common.clients.checkpoint import CheckpointClient
    from tokenmill.common.platform.launcher import RunDir, add_processes, remove_processes
    from tokenmill.common.platform.replicas import model_name, platform_ports, replica_specs, replicas_of

    config = obj.config
    try:  # fail fast on a typo rather than starting replicas that can never load
        with CheckpointClient.from_config(config) as store:
            resolved = store.get(model, include_manifest=False).ref
    except errors.TokenmillError as exc:
        raise _fail(exc) from None
    click.echo(f"{model} resolves to {resolved}")
    svc = config.service("inference")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(svc.host, svc.host)
    table = RunDir(config.data_dir).read_processes()
    old = replicas_of(table, model_name(model))
    specs = replica_specs(
        model,
        replicas,
        table,
        host=host,
        base_port=svc.port,
        options=options,
        config_path=obj.path,
        reserved=platform_ports(config),
    )
    started = time.time()
    try:
        add_processes(config, specs)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"starting {replicas} replica(s) of {model} ...")
    try:
        _wait_serving(config, {s.name: s.health_address for s in specs}, resolved, timeout, started)
    except click.ClickException:
        remove_processes(config, [s.name for s in specs])  # the old replicas (if any) keep serving
        raise
    if old:
        remove_processes(config, [s.name for s in old])
        _forget_stopped(config, old, keep=resolved)
        click.echo(f"replaced {len(old)} replica(s) of {model_name(model)}; they drain and stop")
    click.echo(
        f"serving {model} on {replicas} replica(s) behind {svc.host}:{svc.port} "
        f"(OpenAI HTTP on port {svc.port + 2000})"
    )


def _wait_serving(
    config: Any, pending: dict[str, str], resolved: str, timeout: float, started: float = 0.0
) -> None:
    """Until every replica in `pending` (name -> address) is SERVING. Fails at once, with the
    reason, when one of them reports a load error (its own, in Redis: other replicas of the model
    may serve it fine, e.g. the old generation of a rolling replacement), when the router reports
    one for the model, or when one of them exited (since `started`, epoch seconds)."""
    from tokenmill.common.clients.inference import InferenceClient
    from tokenmill.common.platform.launcher import health_status

    deadline = time.monotonic() + timeout
    with InferenceClient.from_config(config) as router:
        while pending:
            for name, address in list(pending.items()):
                if health_status(config, address, timeout=1.0) == "SERVING":
                    click.echo(f"  {name} SERVING on {address}")
                    del pending[name]
            if not pending:
                return
            reason = _replica_load_error(config, pending, started) or _replica_exit(config, pending, started)
            if reason:
                raise click.ClickException(f"{resolved} cannot be served: {reason}")
            try:
                router.model_info(model=resolved, timeout=5)
            except errors.FailedPrecondition as exc:
                raise click.ClickException(exc.message) from None
            except errors.TokenmillError:
                pass  # no replica of it live yet (or the router is busy): keep waiting
            if time.monotonic() > deadline:
                logs = config.data_dir / "logs"
                raise click.ClickException(
                    f"replica(s) {sorted(pending)} not SERVING after {timeout:.0f}s; see their logs in {logs}"
                )
            time.sleep(POLL_S)


# dispatch/registry.py LOAD_ERRORS (libraries never import services): replica id -> JSON LoadError
LOAD_ERRORS_HASH = "tokenmill:inference:load_errors"
MODELS_HASH = "tokenmill:inference:models"  # dispatch/registry.py MODELS: ref -> tags
LOG_TAIL_LINES = 1


def _replica_load_error(config: Any, names: Iterable[str], started: float) -> str:
    """The load error one of the replicas `names` reported since `started`, or "" (none, or the
    platform's Redis is not reachable from here: the router's answer is the fallback)."""
    import redis

    from tokenmill.common.cli.platform import _running_redis

    try:
        raw = _running_redis(config).hmget(LOAD_ERRORS_HASH, list(names))
    except (redis.RedisError, RuntimeError, OSError):
        return ""
    for body in raw:
        try:
            err = json.loads(body) if body else None
        except ValueError:
            continue
        if isinstance(err, dict) and float(err.get("time", 0.0)) >= started:
            return f"replica {err.get('replica_id')} could not load {err.get('model')}: {err.get('message')}"
    return ""


def _replica_exit(config: Any, names: Iterable[str], started: float) -> str:
    """Why one of the replicas `names`, started by the supervisor since `started`, exited before it
    was SERVING (its exit code and the last lines of its log), or ""."""
    from tokenmill.common.platform.launcher import RunDir

    run_dir = RunDir(config.data_dir)
    state = run_dir.read_state()
    for name in names:
        child = state.get(name)
        if child is None or child.last_exit is None or child.started_at < started:
            continue
        try:
            lines = (run_dir.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        tail = " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())
        return f"replica {name} exited with code {child.last_exit} before SERVING: {tail or 'no log output'}"
    return ""


@click.command()
@click.argument("prompt")
@click.option("--stream/--no-stream", default=False, help="print tokens as they arrive")
@click.option("--max-tokens", type=click.IntRange(0), default=64, show_default=True)
@click.option("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=0)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option(
    "--token-healing", is_flag=True, help="let the model choose how the prompt's last token continues"
)
@click.option("--model", default="")
@click.option("--adapter", default="", help="LoRA adapter checkpoint ref")
@click.option("--json", "as_json", is_flag=True, help="print the full response as JSON")
@click.pass_obj
def generate(
    obj: Any,
    prompt: str,
    stream: bool,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    repetition_penalty: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    token_healing: bool,
    model: str,
    adapter: str,
    as_json: bool,
) -> None:
    """Complete PROMPT with the served model (through the router)."""
    from google.protobuf.json_format import MessageToDict

    from tokenmill.common.clients.inference import InferenceClient

    kwargs = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        token_healing=token_healing,
        model=model,
        adapter=adapter,
    )
    try:
        with InferenceClient.from_config(obj.config) as client:
            if not stream:
                resp = client.generate(prompt, timeout=600, **kwargs)
                if as_json:
                    click.echo(json.dumps(MessageToDict(resp), indent=2))
                else:
                    click.echo(prompt + resp.text)
                    u = resp.usage
                    click.echo(
                        f"[{resp.finish_reason}; {u.completion_tokens} tokens in {u.total_time_s:.2f}s, "
                        f"TTFT {1000 * u.time_to_first_token_s:.0f} ms, replica {resp.replica}]",
                        err=True,
                    )
                return
            click.echo(prompt, nl=False)
            last = None
            for chunk in client.stream(prompt, **kwargs):
                click.echo(chunk.text, nl=False)
                last = chunk
            click.echo()
            if last is not None and last.HasField("usage"):
                u = last.usage
                click.echo(
                    f"[{last.finish_reason}; {u.completion_tokens} tokens in {u.total_time_s:.2f}s, "
                    f"TTFT {1000 * u.time_to_first_token_s:.0f} ms, replica {last.replica}]",
                    err=True,
                )
    except errors.TokenmillError as exc:
        raise _fail(exc) from None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_load(
    client, *, requests: int, concurrency: int, prompt: str, max_tokens: int, model: str = ""
) -> dict:
    """Closed-loop load: `concurrency` workers each stream requests until `requests` are done."""
    ttft, itl, e2e, tokens, failures = [], [], [], [0], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            last = None
            n = 0
            local_itl = []
            first = None
            try:
                for chunk in client.stream(
                    prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, model=model
                ):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if first is None:
                            first = now - start
                        elif last is not None:
                            local_itl.append(now - last)
                        last = now
                        n += len(chunk.token_ids)
            except errors.TokenmillError as exc:
                with lock:
                    failures.append(f"{exc.code}: {exc.message}")
                continue
            with lock:
                ttft.append(first or 0.0)
                itl.extend(local_itl)
                e2e.append(time.perf_counter() - start)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {
        "completed": len(e2e),
        "failed": len(failures),
        "errors": failures[:5],
        "duration_s": elapsed,
        "output_tokens": tokens[0],
        "output_tokens_per_s": tokens[0] / elapsed if elapsed else 0.0,
        "requests_per_s": len(e2e) / elapsed if elapsed else 0.0,
        "ttft_ms_p50": 1000 * _pct(ttft, 50),
        "ttft_ms_p99": 1000 * _pct(ttft, 99),
        "itl_ms_p50": 1000 * _pct(itl, 50),
        "itl_ms_p99": 1000 * _pct(itl, 99),
        "e2e_ms_p50": 1000 * _pct(e2e, 50),
        "e2e_ms_p99": 1000 * _pct(e2e, 99),
    }


@click.group()
def bench() -> None:
    """Load generators against the running platform."""


@bench.command("serve")
@click.option("--requests", "num_requests", type=click.IntRange(1), default=64, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--prompt", default="def fibonacci(n):", show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--model", default="")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def bench_serve(
    obj: Any, num_requests: int, concurrency: int, prompt: str, max_tokens: int, model: str, as_json: bool
) -> None:
    """Stream NUM requests with CONCURRENCY workers through the router; report throughput, TTFT, ITL."""
    from tokenmill.common.clients.inference import InferenceClient

    with InferenceClient.from_config(obj.config) as client:
        try:
            client.model_info(timeout=10)
        except errors.TokenmillError as exc:
            raise _fail(exc) from None
        result = run_load(
            client,
            requests=num_requests,
            concurrency=concurrency,
            prompt=prompt,
            max_tokens=max_tokens,
            model=model,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        click.echo(f"  {key:<22} {shown}")
    if result["failed"]:
        raise click.ClickException(f"{result['failed']} request(s) failed, e.g. {result['errors'][0]}")
