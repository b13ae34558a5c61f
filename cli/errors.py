"""How every pdray command reports expected errors: one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import functools

import typer


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def clean_errors(command):
    """Turn the library's expected errors (bad config, missing prior or file, cluster refusals) into `fail`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from pdray.cluster.submit import SubmitError
        from pdray.config import ConfigError
        from pdray.priors.diffusion import PriorNotFoundError

        try:
            return command(*args, **kwargs)
        except (ConfigError, PriorNotFoundError, SubmitError, FileNotFoundError) as err:
            fail(str(err))

    return wrapper
