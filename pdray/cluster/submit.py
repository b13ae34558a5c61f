"""`pdray run` as a Ray job: the job's files, its runtime_env, the cluster's token, and one-line errors.

The run's config is resolved and validated on the submitting machine, then travels as a file in the job's
working_dir, so the entrypoint stays a plain `pdray run --config pdray-run.yaml --out OUT`. The local working
copy, when asked for, travels as an installed package folder in py_modules: the job's driver and every actor
then import it (the source folder as working_dir would not do: `pdray.cli` lives in `cli/` and exists only in
an installed package).

The run folder is written by the job's driver alone (checkpoints and views come to it through Ray), so OUT
must be a path the driver's node can write; on a shared filesystem `pdray resume OUT` works from any node.

Token authentication mirrors Ray's own clients: the token is sent only when ``RAY_AUTH_MODE=token``, and it
comes from ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. It
is never printed or logged: errors name where it came from, not what it is.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdray.config import RunConfig, config_to_yaml

CONFIG_FILE = "pdray-run.yaml"
"""The resolved config inside the job's working_dir."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"
"""Seconds the job supervisor waits after SIGTERM before SIGKILL (read from the job's env_vars)."""
AUTH_MODE, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_HINT = (
    f"set {AUTH_MODE}=token and {TOKEN_ENV} (or {TOKEN_PATH_ENV}, or ~/.ray/auth_token); "
    "`ray get-auth-token` on the head node prints the cluster's token"
)


class SubmitError(RuntimeError):
    """A submission or job request that cannot go on; the message is one line for the user."""


@dataclass(frozen=True, repr=False)
class Token:
    """A Ray auth token and where it was found; its repr and str never show the value."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"Token(from {self.source})"

    __str__ = __repr__


def auth_mode(env: Mapping[str, str] = os.environ) -> str:
    """`token` or `disabled`, from RAY_AUTH_MODE as Ray's clients read it (unset: no token is sent)."""
    mode = env.get(AUTH_MODE, "").strip().lower() or "disabled"
    if mode not in ("token", "disabled"):
        raise SubmitError(f"{AUTH_MODE}={env[AUTH_MODE]!r}: expected token or disabled")
    return mode


def find_token(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Token | None:
    """The token from RAY_AUTH_TOKEN, then the file at RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; None if none."""
    if env.get(TOKEN_ENV, "").strip():
        return Token(env[TOKEN_ENV].strip(), TOKEN_ENV)
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        if not path.is_file():
            raise SubmitError(f"{TOKEN_PATH_ENV} names {path}, which is not a file")
        return Token(path.read_text().strip(), f"{TOKEN_PATH_ENV} ({path})")
    path = (home or Path.home()) / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


def auth_headers(env: Mapping[str, str] = os.environ, home: Path | None = None) -> tuple[dict[str, str], Token | None]:
    """The Authorization header to send (empty unless RAY_AUTH_MODE=token) and the token it carries."""
    if auth_mode(env) != "token":
        return {}, None
    token = find_token(env, home)
    if token is None:
        raise SubmitError(f"{AUTH_MODE}=token but no token was found: {TOKEN_HINT}")
    return {"Authorization": f"Bearer {token.value}"}, token


def check_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL without trailing slashes; refuses anything but http(s)://HOST:PORT."""
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address}: give the dashboard's HTTP address, e.g. http://HEAD:8265")
    return address.rstrip("/")


def check_out(out: str) -> str:
    """The run folder on the cluster: an absolute filesystem path (a bucket must be mounted and given by its path)."""
    if "://" in out:
        raise SubmitError(
            f"--out {out}: pdray writes run folders to a filesystem path; mount the bucket on the cluster's nodes "
            "and pass its mount path (e.g. /mnt/runs/a-cube)"
        )
    if not os.path.isabs(out):
        raise SubmitError(f"--out {out}: give an absolute path that the cluster can write (a shared filesystem)")
    return os.path.normpath(out)


def entrypoint(out: str) -> str:
    """The job's shell command: `pdray run` on the config file in its working_dir."""
    return shlex.join(["pdray", "run", "--config", CONFIG_FILE, "--out", out])


def write_job_folder(config: RunConfig, folder: Path) -> Path:
    """Write the resolved config into the folder that becomes the job's working_dir; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config_to_yaml(config))
    return folder


def package_checkout(source: Path, dest: Path) -> Path:
    """Install the pdray checkout at `source` into `dest` without its dependencies; returns dest/pdray, the package
    folder that py_modules ships. Ray names a folder by its content hash (a wheel only by its file name, and pip
    would install every dependency of a wheel on each node), so an edited checkout never meets a stale cache."""
    if not (source / "pyproject.toml").is_file() or not (source / "pdray").is_dir():
        raise SubmitError(f"--working-dir {source}: not a pdray checkout (no pyproject.toml and pdray/)")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(dest)]
    if importlib.util.find_spec("setuptools"):  # build offline with the local setuptools
        command.append("--no-build-isolation")
    done = subprocess.run([*command, str(source)], capture_output=True, text=True)
    package = dest / "pdray"
    if done.returncode or not (package / "cli" / "main.py").is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no pdray package was written"]
        raise SubmitError(f"--working-dir {source}: packaging the checkout failed: {last[0]}")
    return package


def read_runtime_env(path: Path) -> dict[str, Any]:
    """A user's runtime_env YAML (env_vars, pip, ...) to merge into the job's; safe YAML only."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping such as {{env_vars: {{...}}}}")
    if "working_dir" in data:
        raise SubmitError(f"--runtime-env {path}: working_dir is pdray's (the config); use --working-dir for code")
    return data


def runtime_env(job_folder: Path, package: Path | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """The job's runtime_env: the config folder as working_dir, the working copy's package in py_modules, a stop
    grace period, and the user's own keys (env_vars, pip, ...; theirs win)."""
    env = dict(extra or {})
    env["working_dir"] = str(job_folder)
    # `pdray jobs stop` sends SIGTERM, on which `pdray run` checkpoints; Ray's default 3 s before SIGKILL is too short.
    env["env_vars"] = {STOP_WAIT: "60", **env.get("env_vars", {})}
    if package is not None:
        env["py_modules"] = [*env.get("py_modules", []), str(package)]
    return env


def submission_id() -> str:
    """A readable, unique job id: pdray-<date>-<time>-<6 hex>."""
    return f"pdray-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class Jobs:
    """The Ray Jobs API of one cluster, with every failure turned into a one-line SubmitError."""

    def __init__(self, address: str | None):
        self.address = check_address(address)
        headers, self.token = auth_headers()
        with self._errors():
            from ray.job_submission import JobSubmissionClient

            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            if "Authentication failed" in str(err) and self.token:  # HTTP 403: a token was sent and refused
                raise SubmitError(
                    f"the Ray cluster at {self.address} refused the token from {self.token.source}"
                ) from None
            raise SubmitError(f"the Ray cluster at {self.address} requires a token: {TOKEN_HINT}") from None
        except ConnectionError:
            raise SubmitError(
                f"cannot reach a Ray dashboard at {self.address}: is the cluster up and is this its dashboard "
                "address (default port 8265)?"
            ) from None
        except RuntimeError as err:  # the Jobs API answered with an error status (e.g. an unknown job id)
            raise SubmitError(f"{self.address}: {' '.join(str(err).split())}") from None

    def submit(self, entry: str, env: dict, metadata: dict[str, str]) -> str:
        with self._errors():
            return self.client.submit_job(
                entrypoint=entry, runtime_env=env, submission_id=submission_id(), metadata=metadata
            )

    def status(self, job_id: str) -> tuple[str, str]:
        """(status, message) of a job."""
        with self._errors():
            info = self.client.get_job_info(job_id)
        return str(info.status), info.message or ""

    def logs(self, job_id: str) -> str:
        with self._errors():
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream a job's logs until it ends; returns its final status."""

        async def tail() -> None:
            async for lines in self.client.tail_job_logs(job_id):
                write(lines)

        with self._errors():
            asyncio.run(tail())
        while (status := self.status(job_id)[0]) not in TERMINAL:  # the log stream can close a moment early
            time.sleep(1.0)
        return status

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        with self._errors():
            return self.client.stop_job(job_id)
