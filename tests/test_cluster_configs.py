"""Cluster deployment files: the AWS cluster launcher config, the KubeRay manifests and the job
runtime env. Each is checked by the tool that consumes it where that tool runs offline (Ray's own
cluster-config validation and runtime-env parsing and packaging), and for the properties that
matter here: loopback-only endpoints, no credentials in any deployment file (docker/ included),
the image tag and Ray version agreeing with pyproject.toml, GPU placement, and the KubeRay
cluster spec written once."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster_configs"
DOCKER = ROOT / "docker"


def load(path: Path):
    return yaml.safe_load(path.read_text())


# --- credentials -------------------------------------------------------------------------------

SECRET_KEY = re.compile(r"(?i)\b([A-Za-z0-9_.-]*(?:password|passwd|secret|token|access_key|accesskey|api_key|apikey|private_key)[A-Za-z0-9_.-]*)"
                        r"[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"'#,}]*)")
# empty, compose/shell interpolation, an ellipsis/<placeholder>, or the path of a file that holds the secret
PLACEHOLDER = re.compile(r"^(|\$\{.*|\$\$.*|\.\.\.|<[^>]*>|~?/[\w./-]+)$")
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
    assert credential_findings("RAY_AUTH_TOKEN_PATH: /ray-auth/auth_token\n~/.ray/auth_token: ~/.ray/auth_token") == []


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


def test_aws_dashboard_listens_on_loopback_and_image_is_the_project_version(pyproject):
    cfg = aws_config()
    start = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--dashboard-host=127\.0\.0\.1(\s|$)", start), start
    assert "0.0.0.0" not in start
    assert cfg["docker"]["image"] == pyproject.image
    for remote, local in cfg["file_mounts"].items():
        assert local.startswith("~/") or (ROOT / local).exists(), (remote, local)  # ~/: made on the laptop (the token)
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


def test_kuberay_cluster_groups_images_gpus_and_private_head(pyproject):
    docs = kuberay("raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == pyproject.lower_bounds["ray"]
    assert {c["image"] for c in containers(spec)} == {pyproject.image}
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


def test_kuberay_clusters_use_token_auth_and_fence_the_head():
    """Ray 2.60 turns token auth on only where it is asked for: the operator's authOptions does, and
    a NetworkPolicy lets only the cluster's Ray pods (and Prometheus, on the metrics port) reach the head."""
    job = kuberay("rayjob.yaml")
    for spec, docs in ((kuberay("raycluster.yaml")["RayCluster"]["spec"], kuberay("raycluster.yaml")), (job["RayJob"]["spec"]["rayClusterSpec"], job)):
        assert spec["authOptions"] == {"mode": "token"}
        policy = docs["NetworkPolicy"]["spec"]
        assert policy["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}} and policy["policyTypes"] == ["Ingress"]
        ray_pods, prometheus = policy["ingress"]
        assert ray_pods == {"from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]}  # every port, Ray pods only
        assert prometheus["ports"] == [{"port": 8080, "protocol": "TCP"}]
        assert prometheus["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def test_aws_nodes_start_with_token_auth_and_the_token_file():
    cfg = aws_config()
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # generated by `ray get-auth-token --generate`


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


def test_a_stopped_job_has_time_to_shut_its_pools_down():
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s unless set): too
    # little to delete both pools and end the MLflow run on a loaded head.
    assert int(runtime_env()["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60


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
