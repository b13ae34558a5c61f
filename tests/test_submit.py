"""`pdray submit` and `pdray jobs`: token lookup, the job's files and runtime_env, one-line errors (fast); then
real Ray clusters started by `ray start` on this machine: a token-authenticated head that runs a submitted job to
SUCCEEDED and refuses wrong tokens and addresses (in CI), then (slow) a stopped job, the shipped working copy, and two
raylets whose particle actors must land on both nodes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray.cluster import submit
from pdray.config import load_config
from pdray.vsd.checkpoint import checkpoint_folder, checkpoint_step

runner = CliRunner()
BIN = Path(sys.executable).parent
TOKEN = "pdray-test-token-4f1c9a7e2b"  # a test cluster's token: it must never show in any output


def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "token"
    path.write_text("from-path\n")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert submit.find_token(env, home).value == "from-env"
    assert submit.find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home).value == "from-path"
    token = submit.find_token({}, home)
    assert token.value == "from-home" and "from-home" not in repr(token) + str(token)
    assert submit.find_token({}, tmp_path / "nobody") is None
    with pytest.raises(submit.SubmitError, match="not a file"):
        submit.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_the_token_is_sent_only_in_token_mode(tmp_path):
    env = {"RAY_AUTH_TOKEN": "abc"}
    assert submit.auth_headers(env, tmp_path) == ({}, None)  # like Ray's clients: mode unset sends nothing
    assert submit.auth_headers({**env, "RAY_AUTH_MODE": "disabled"}, tmp_path) == ({}, None)
    headers, token = submit.auth_headers({**env, "RAY_AUTH_MODE": "TOKEN"}, tmp_path)
    assert headers == {"Authorization": "Bearer abc"} and token.source == "RAY_AUTH_TOKEN"
    with pytest.raises(submit.SubmitError, match="no token was found"):
        submit.auth_headers({"RAY_AUTH_MODE": "token"}, tmp_path)
    with pytest.raises(submit.SubmitError, match="expected token or disabled"):
        submit.auth_headers({"RAY_AUTH_MODE": "on"}, tmp_path)


def test_addresses_and_run_folders_are_checked():
    assert submit.check_address("http://head:8265/") == "http://head:8265"
    for bad in (None, "", "head:8265", "ray://head:10001"):
        with pytest.raises(submit.SubmitError):
            submit.check_address(bad)
    assert submit.check_out("/mnt/runs/a//b/") == "/mnt/runs/a/b"
    with pytest.raises(submit.SubmitError, match="mount the bucket"):
        submit.check_out("s3://bucket/runs/a")
    with pytest.raises(submit.SubmitError, match="absolute path"):
        submit.check_out("runs/a")


def test_the_job_carries_the_resolved_config_and_runs_pdray_run(tmp_path):
    config = load_config("default", ["nerf.resolution=16"], {"particles": 64, "prompt": "a red cube"})
    folder = submit.write_job_folder(config, tmp_path / "job")
    assert load_config(str(folder / submit.CONFIG_FILE)) == config
    assert submit.entrypoint("/mnt/runs/my run") == "pdray run --config pdray-run.yaml --out '/mnt/runs/my run'"
    env = submit.runtime_env(folder)
    assert env == {"working_dir": str(folder), "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}
    user = tmp_path / "env.yaml"
    user.write_text("env_vars: {HF_HOME: /mnt/hf, RAY_JOB_STOP_WAIT_TIME_S: '300'}\npy_modules: [/opt/extra]\n")
    env = submit.runtime_env(folder, tmp_path / "site" / "pdray", submit.read_runtime_env(user))
    assert env["env_vars"] == {"HF_HOME": "/mnt/hf", "RAY_JOB_STOP_WAIT_TIME_S": "300"}
    assert env["py_modules"] == ["/opt/extra", str(tmp_path / "site" / "pdray")]
    user.write_text("working_dir: .\n")
    with pytest.raises(submit.SubmitError, match="working_dir is pdray's"):
        submit.read_runtime_env(user)


def test_the_shipped_runtime_env_example_merges(tmp_path):
    example = Path(__file__).parents[1] / "deploy" / "runtime_env.yaml"
    env = submit.runtime_env(tmp_path, None, submit.read_runtime_env(example))
    assert env["working_dir"] == str(tmp_path) and "env_vars" in env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_is_one_line_and_never_shows_the_token(tmp_path):
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    args = ["submit", "--address", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2 and "cannot reach a Ray dashboard at http://127.0.0.1:" in result.output
    assert TOKEN not in result.output and "Traceback" not in result.output
    for bad in (["--address", "head:8265", "--out", "/x"], ["--address", "http://h:1", "--out", "runs/x"]):
        result = runner.invoke(app, ["submit", *bad])
        assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    result = runner.invoke(app, ["submit", "--address", "http://h:1", "--out", "/x", "--set", "lora.rank=0"])
    assert result.exit_code == 2 and "lora.rank" in result.output


# ---- real clusters: `ray start` on this machine, stopped by the fixtures ----


def ray_env(**extra: str) -> dict[str, str]:
    """The environment of a test's Ray processes and clients: this venv on PATH (the job runs `pdray`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def start_node(temp: Path, env: dict[str, str], *args: str) -> None:
    """`ray start` with every port of its own (other clusters may run on this machine) and a short temp dir; tried
    twice, with fresh ports, because a port found free can be taken by another process before Ray binds it."""
    for _attempt in range(2):
        ports = [free_port() for _ in range(6)]
        low = 10000 + (ports[0] % 200) * 100  # worker ports below Linux's ephemeral range (32768 and up)
        command = [
            str(BIN / "ray"),
            "start",
            *args,
            f"--temp-dir={temp}",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 99}",
            "--disable-usage-stats",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return
        stop_nodes(temp)
    raise AssertionError(f"ray start failed twice: {done.stderr[-3000:]} {done.stdout[-3000:]}")


def stop_nodes(temp: Path, at_once: bool = False) -> int:
    """Stop only the Ray processes of this temp dir (and their workers): never a global `ray stop`. at_once: SIGKILL
    (a node that disappears) instead of SIGTERM first. Returns how many processes were stopped."""
    mine = {os.getpid(), os.getppid()}
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid not in mine and any(str(temp) in part for part in proc.info["cmdline"] or []):
            roots.append(proc)
    procs = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs |= {c.pid: c for c in root.children(recursive=True)}
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.kill() if at_once else proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


def pdray_cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "pdray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


TINY_RUN = [
    "--steps",
    "4",
    "--stages",
    "nerf",
    "--wandb",
    "offline",
    "--set",
    "nerf.resolution=16",
    "--set",
    "nerf.n_samples=8",
    "--set",
    "eval_views=2",
    "--set",
    "log_every=1",
    "--set",
    "checkpoint_every=2",
]


@pytest.fixture(scope="module")
def token_head():
    """A one-node cluster with token authentication (RAY_AUTH_MODE=token on the head): its dashboard URL."""
    temp = Path(tempfile.mkdtemp(prefix="pdt", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    dashboard = free_port()
    env = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    try:
        start_node(
            temp,
            env,
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
        )
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_nodes(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_submitted_run_succeeds_and_fills_the_run_folder(token_head, tmp_path):
    out = tmp_path / "run"
    client = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    args = ["submit", "--address", token_head, "--out", str(out), "--particles", "2", *TINY_RUN, "--follow"]
    done = pdray_cli(*args, env=client)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("pdray-") and "SUCCEEDED" in done.stderr
    assert "pdray run --config pdray-run.yaml --out" in done.stdout and "actor nodes:" in done.stdout
    assert TOKEN not in done.stdout + done.stderr
    for name in (
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
        "particles/00/views.png",
        "particles/01/views.png",
    ):
        assert (out / name).exists(), name
    assert (checkpoint_folder(out) / "manifest.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["particles"] == 2 and summary["executor"] == "ray"
    assert summary["placement"]["nodes"]["score"]["node_id"]
    assert load_config(str(out / "config.yaml")).particles == 2

    status = pdray_cli("jobs", "status", job_id, "--address", token_head, env=client, timeout=120)
    assert status.returncode == 0 and status.stdout.startswith("SUCCEEDED"), status.stdout + status.stderr
    logs = pdray_cli("jobs", "logs", job_id, "--address", token_head, env=client, timeout=120)
    assert logs.returncode == 0 and f"run folder: {out}" in logs.stdout
    stop = pdray_cli("jobs", "stop", job_id, "--address", token_head, env=client, timeout=120)
    assert stop.returncode == 0 and "already ended" in stop.stdout


def test_a_missing_or_wrong_token_and_a_wrong_address_are_one_clear_line(token_head, tmp_path):
    args = ["submit", "--address", token_head, "--out", str(tmp_path / "run"), "--particles", "2"]
    cases = {
        "requires a token: set RAY_AUTH_MODE=token": ray_env(RAY_AUTH_TOKEN=TOKEN),  # no mode: Ray sends nothing
        "refused the token from RAY_AUTH_TOKEN": ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong-" + TOKEN),
    }
    for expected, env in cases.items():
        done = pdray_cli(*args, env=env, timeout=120)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and TOKEN not in done.stdout + done.stderr
    wrong_port = token_head.rsplit(":", 1)[0] + f":{free_port()}"
    done = pdray_cli("jobs", "status", "x", "--address", wrong_port, env=cases[next(iter(cases))], timeout=120)
    assert done.returncode == 2 and "cannot reach a Ray dashboard" in done.stderr
    done = pdray_cli("jobs", "status", "no-such-job", "--address", token_head, env=ray_env(), timeout=120)
    assert done.returncode == 2 and "requires a token" in done.stderr


@pytest.mark.slow
def test_a_stopped_job_checkpoints_first(token_head, tmp_path):
    """`pdray jobs stop`: SIGTERM reaches `pdray run`, which saves a checkpoint within the grace period pdray sets
    (Ray's own default of 3 s before SIGKILL is too short for that), so `pdray resume OUT` can go on."""
    out = tmp_path / "run"
    client = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    args = ["submit", "--address", token_head, "--out", str(out), "--particles", "2", *TINY_RUN, "--steps", "500"]
    done = pdray_cli(*args, env=client)
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.strip().splitlines()[-1]
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    stop = pdray_cli("jobs", "stop", job_id, "--address", token_head, env=client, timeout=120)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    status = ""
    while time.time() < deadline and not status.startswith(submit.TERMINAL):
        status = pdray_cli("jobs", "status", job_id, "--address", token_head, env=client, timeout=120).stdout
        time.sleep(1)
    assert status.startswith("STOPPED"), status
    logs = pdray_cli("jobs", "logs", job_id, "--address", token_head, env=client, timeout=120).stdout
    assert "checkpoint saved; continue with `pdray resume" in logs, logs[-3000:]
    step = checkpoint_step(out)
    assert 3 <= step < 500


@pytest.mark.slow
def test_the_working_copy_travels_to_the_job(token_head, tmp_path):
    """--working-dir ships this checkout: the job's python imports pdray (and its CLI) from the shipped copy."""
    os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"] = "token", TOKEN
    try:
        jobs = submit.Jobs(token_head)
        package = submit.package_checkout(Path(__file__).parents[1], tmp_path / "site")
        env = submit.runtime_env(submit.write_job_folder(load_config("default"), tmp_path / "job"), package)
        probe = "python -c 'import pdray, pdray.cli.main; print(\"PDRAY\", pdray.__file__)'"
        job_id = jobs.submit(probe, env, {})
        lines: list[str] = []
        assert jobs.follow(job_id, lines.append) == "SUCCEEDED", "".join(lines)
    finally:
        del os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]
    shipped = [line for line in "".join(lines).splitlines() if line.startswith("PDRAY ")]
    assert shipped and "runtime_resources/py_modules_files/" in shipped[0], shipped


@pytest.mark.slow
def test_two_nodes_get_particle_actors_and_the_score_actor_its_own_gpu(tmp_path):
    """Two raylets on this machine, each declaring 2 CPUs and 2 (logical) GPUs: a 4-particle job plans the
    ScoreActor on a GPU of its own and 3 particle actors SPREAD over both nodes. The torch CPU build runs every
    actor on the CPU. Set PDRAY_TWO_NODE_EVIDENCE=FILE to keep the printed placement and node ids."""
    temp_head = Path(tempfile.mkdtemp(prefix="pdh", dir="/tmp"))
    temp_worker = Path(tempfile.mkdtemp(prefix="pdw", dir="/tmp"))
    env = ray_env(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    gcs, dashboard = free_port(), free_port()
    try:
        common = ["--num-cpus=2", "--num-gpus=2", "--node-ip-address=127.0.0.1"]
        start_node(temp_head, env, "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", *common)
        start_node(temp_worker, env, f"--address=127.0.0.1:{gcs}", *common)
        out = tmp_path / "run"
        address = f"http://127.0.0.1:{dashboard}"
        done = pdray_cli(
            "submit", "--address", address, "--out", str(out), "--particles", "4", *TINY_RUN, "--follow", env=env
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    finally:
        for temp in (temp_worker, temp_head):
            stop_nodes(temp)
            shutil.rmtree(temp, ignore_errors=True)
    placement = json.loads((out / "summary.json").read_text())["placement"]
    nodes = placement["nodes"]
    particle_nodes = {a["node_id"] for a in nodes["actors"]}
    assert placement["score_gpus"] == 1 and placement["actor_gpus"] == 1 and placement["strategy"] == "SPREAD"
    assert len(particle_nodes) == 2, nodes
    starts = ("placement:", "actor nodes:", "  ScoreActor on node", "  particles [")
    printed = [line for line in done.stdout.splitlines() if line.startswith(starts)]
    if os.environ.get("PDRAY_TWO_NODE_EVIDENCE"):
        Path(os.environ["PDRAY_TWO_NODE_EVIDENCE"]).write_text(
            "Two raylets on one machine (ray start --head / ray start --address, 2 CPUs + 2 logical GPUs each),\n"
            "`pdray submit --particles 4 --steps 4 ...` (tests/test_submit.py::test_two_nodes_...).\n\n"
            "Printed by the run:\n"
            + "\n".join(printed)
            + "\n\nsummary.json placement:\n"
            + yaml.safe_dump(placement, sort_keys=False)
        )


@pytest.mark.slow
def test_a_run_survives_the_loss_of_a_worker_node(tmp_path):
    """Two raylets; the worker node's raylet and its workers are SIGKILLed mid-run. Its actors come back on the head
    (which has room for every bundle), the driver restores the last checkpoint, and the job still SUCCEEDS."""
    temp_head = Path(tempfile.mkdtemp(prefix="pdh", dir="/tmp"))
    temp_worker = Path(tempfile.mkdtemp(prefix="pdw", dir="/tmp"))
    env = ray_env(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    gcs, dashboard = free_port(), free_port()
    out = tmp_path / "run"
    try:
        ip = "--node-ip-address=127.0.0.1"
        start_node(
            temp_head,
            env,
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=4",
            "--num-gpus=4",
            ip,
        )
        start_node(temp_worker, env, f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--num-gpus=2", ip)
        args = ["submit", "--address", f"http://127.0.0.1:{dashboard}", "--out", str(out), "--particles", "4"]
        args += ["--actors", "2", *TINY_RUN, "--steps", "16", "--follow"]
        log = (tmp_path / "submit.log").open("w+")  # a file, not a pipe: nothing blocks the CLI while we watch
        job = subprocess.Popen([str(BIN / "pdray"), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        metrics, deadline = out / "metrics.jsonl", time.time() + 900
        while time.time() < deadline and job.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert job.poll() is None, "the run ended before the worker node could be killed"
        killed_at = len(metrics.read_text().splitlines())
        assert stop_nodes(temp_worker, at_once=True) > 0
        job.wait(timeout=1200)
        stdout = (tmp_path / "submit.log").read_text()
    finally:
        for temp in (temp_worker, temp_head):
            stop_nodes(temp)
            shutil.rmtree(temp, ignore_errors=True)
    assert job.returncode == 0, stdout[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 16 and summary["recoveries"] >= 1, summary
    nodes = summary["placement"]["nodes"]
    assert len({a["node_id"] for a in [nodes["score"], *nodes["actors"]]}) == 2, "both nodes held actors at start"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 16 and set(steps) == set(range(1, 17))
    starts = ("placement:", "actor nodes:", "  ScoreActor on node", "  particles [", "job ")
    printed = [line for line in stdout.splitlines() if line.startswith(starts) or "an actor was lost" in line]
    if os.environ.get("PDRAY_NODE_LOSS_EVIDENCE"):
        Path(os.environ["PDRAY_NODE_LOSS_EVIDENCE"]).write_text(
            "Head (4 CPUs, 4 logical GPUs) + worker raylet (2 CPUs, 2 logical GPUs) on one machine; `pdray submit\n"
            "--particles 4 --actors 2 --steps 16 --follow`; the worker node's raylet and workers SIGKILLed after\n"
            f"{killed_at} of 16 metric lines (tests/test_submit.py::test_a_run_survives_the_loss_of_a_worker_node).\n\n"
            + "\n".join(printed)
            + f"\n\nrecoveries: {summary['recoveries']}; steps in metrics.jsonl: {steps}\n"
        )
