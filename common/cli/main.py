"""`tokenmill`: one click group; each area registers its commands from its own module."""

from __future__ import annotations

import importlib
import sys

import click

from tokenmill.common.config import Config, ConfigError, load_config

# area module -> attribute holding its click command/group (modules that are absent are skipped,
# so a partial checkout still has a working CLI)
COMMANDS = {
    "tokenmill.common.cli.platform": ["up", "down", "status"],
    "tokenmill.common.cli.data": ["data"],
    "tokenmill.common.cli.train": ["train"],
    "tokenmill.common.cli.ckpt": ["ckpt"],
    "tokenmill.common.cli.compress": ["compress"],
    "tokenmill.common.cli.eval": ["eval_cmd"],
    "tokenmill.common.cli.serve": ["serve", "generate", "bench"],
    "tokenmill.common.cli.images": ["images"],
    "tokenmill.common.cli.cluster": ["cluster"],
}


class ConfigContext:
    """Loads the config once, on first use, so `--help` works without a valid config."""

    def __init__(self, path: str | None):
        self.path = path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.path)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
        return self._config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="TOKENMILL_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML config file.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """tokenmill: raw text to a trained, compressed, served model."""
    ctx.obj = ConfigContext(config_path)


def _register() -> None:
    for module_name, attributes in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        for attribute in attributes:
            command = getattr(module, attribute, None)
            if command is not None:
                cli.add_command(command)


_register()


def main() -> None:
    sys.exit(cli(standalone_mode=True))


if __name__ == "__main__":
    main()
