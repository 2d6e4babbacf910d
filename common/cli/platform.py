"""`tokenmill up | down | status`: the local platform."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from tokenmill.common.config import Config, ConfigError, load_config
from tokenmill.common.platform import launcher

if TYPE_CHECKING:
    import redis

JOB_TYPES = ("ingest", "train", "compress")


def _local_config(obj) -> Config:
    """The config without the auth check: these verbs only touch local processes, health
    (which is open) and Redis, and `up` runs before the token file exists."""
    try:
        return load_config(obj.path, auth={"disabled": True})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _running_redis(config: Config) -> redis.Redis:
    """A client for the platform's Redis. Unlike `connect`, never starts the embedded server: a
    second one would take another port, and the supervisor (which restarts it on the children's
    port) reports why it is down."""
    from tokenmill.common.platform.redis_embedded import EmbeddedRedis
    from tokenmill.common.redis_conn import connect_url

    if config.redis_url:
        return connect_url(config.redis_url)
    server = EmbeddedRedis(config.data_dir)
    rec = server.recorded()
    if rec is None or not server.running():
        raise RuntimeError("the embedded Redis is not running (see the redis row above)")
    return connect_url(rec[0])


@click.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for SERVING.")
@click.pass_obj
def up(obj, timeout: float) -> None:
    """Start Redis and the five services locally; wait until all are SERVING."""
    launcher.ensure_auth_token(_local_config(obj).data_dir)
    config = obj.config
    try:
        addresses = launcher.up(config, obj.path, timeout=timeout)
    except (TimeoutError, launcher.PortInUseError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"tokenmill is up (data dir {config.data_dir})")
    for name, address in addresses.items():
        click.echo(f"  {name:<11} grpc://{address}   metrics :{config.service(name).effective_metrics_port}")


@click.command()
@click.pass_obj
def down(obj) -> None:
    """Stop every local service and the embedded Redis."""
    stopped = launcher.down(_local_config(obj))
    click.echo("tokenmill is down" if stopped else "tokenmill was not running (cleaned up leftovers)")


@click.command()
@click.pass_obj
def status(obj) -> None:
    """Each service with its health, queue depths and running jobs."""
    config = _local_config(obj)
    rows = launcher.process_table(config)
    if not rows:
        raise click.ClickException("tokenmill is not running; start it with `tokenmill up`")
    width = max(14, *(len(str(row["name"])) + 2 for row in rows))
    click.echo(f"{'process':<{width}}{'address':<22}{'pid':<9}{'restarts':<10}health")
    for row in rows:
        pid = row["pid"] or "-"
        address = row["address"] or "-"
        click.echo(f"{row['name']:<{width}}{address:<22}{pid!s:<9}{row['restarts']!s:<10}{row['health']}")
    for row in rows:
        if row.get("error"):
            click.echo(f"\n{row['name']}: last start failed, retrying: {row['error']}")
    try:
        from tokenmill.common.jobs import JobQueue, JobState

        queue = JobQueue(_running_redis(config))
        click.echo(f"\n{'queue':<14}{'waiting':<10}{'running':<10}dead")
        running = []
        for job_type in JOB_TYPES:
            depth = queue.depth(job_type)
            click.echo(f"{job_type:<14}{depth['waiting']:<10}{depth['running']:<10}{depth['dead']}")
            running += queue.list(job_type, state=JobState.RUNNING)[0]
        if running:
            click.echo("\nrunning jobs")
            for job in running:
                latest = ", ".join(f"{k}={v}" for k, v in list(job.progress.items())[:5])
                click.echo(f"  {job.id}  {job.type:<9} attempt {job.attempts}  {latest}")
    except Exception as exc:  # status must still print what it has when Redis is down
        click.echo(f"\nqueues: unavailable ({exc})")
