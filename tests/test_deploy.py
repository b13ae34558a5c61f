"""deploy/: the manifests are valid YAML with the keys, resources and entrypoints their tools need (schema level;
nothing here builds an image or talks to a cloud)."""

import json
import re
import shlex
from pathlib import Path

import yaml

from pdray.cluster.placement import Resources, plan_placement
from pdray.config import load_config

DEPLOY = Path(__file__).parents[1] / "deploy"


def load(name: str) -> dict:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict), name
    return data


def pdray_run_config(entrypoint: str):
    """The config a `pdray run ...` entrypoint resolves to (checks its options as `pdray run` would)."""
    args = shlex.split(entrypoint)
    assert args[:2] == ["pdray", "run"], entrypoint
    options = dict(zip(args[2::2], args[3::2], strict=True))
    extra = {"particles": int(options["--particles"]), "prompt": options.get("--prompt")}
    assert options["--out"].startswith("/mnt/pdray/"), "the run folder must be on the shared volume"
    return load_config(options.get("--config", "default"), None, extra)


def test_the_rayjob_runs_64_particles_on_a_gpu_worker_group():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    config = pdray_run_config(spec["entrypoint"])
    assert config.particles == 64
    assert isinstance(spec["runtimeEnvYAML"], str) and "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"].startswith("2.")
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] and "rayStartParams" in cluster["headGroupSpec"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["groupName"] and gpu["replicas"] >= 2 and "rayStartParams" in gpu
    container = gpu["template"]["spec"]["containers"][0]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
    # Every pod mounts the shared claim where --out points.
    claim = load("pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in (cluster["headGroupSpec"]["template"]["spec"], gpu["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["runs"] == "/mnt/pdray"
        assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The placement this cluster gets: the ScoreActor on its own GPU, every bundle fits on one pod.
    gpus, cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    pods = gpu["replicas"]
    resources = Resources(cpus=cpus * pods, gpus=gpus * pods, nodes=pods + 1, cpus_per_gpu=cpus / gpus)
    plan = plan_placement(resources, config.particles)
    assert plan.score_gpus == 1 and plan.strategy == "SPREAD" and plan.actor_cpus * gpus <= cpus


def test_the_cluster_launcher_yaml_passes_rays_schema():
    import jsonschema  # a dependency of ray
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load("cluster.yaml")
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)
    assert config["docker"]["image"] and "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start


def test_the_dockerfile_builds_the_cuda_extensions_and_installs_pdray():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0] in ("ARG", "FROM") and "FROM" in instructions and instructions[-1] == "CMD"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M) and "nvidia/cuda:" in text
    assert "tiny-cuda-nn/#subdirectory=bindings/torch" in text and "NVlabs/nvdiffrast" in text
    assert "COPY . /opt/pdray" in text and "pip install /opt/pdray" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_runtime_env_example_holds_no_secrets():
    env = load("runtime_env.yaml")
    assert set(env) <= {"env_vars", "pip", "py_modules", "excludes", "working_dir"}
    assert not any(re.search("KEY|TOKEN|SECRET|PASSWORD", k) for k in env["env_vars"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
