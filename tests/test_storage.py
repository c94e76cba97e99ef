"""s3:// sources, checkpoints and MLflow artifacts against a real S3-compatible server: moto's server
mode on 127.0.0.1 with its IAM checks on, so every request is signed and authorised and a user
without a policy is refused."""

import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import boto3
import pytest

from distar import storage
from distar.cluster.session import free_port
from distar.config import load_config
from distar.errors import UserError
from distar.models import tiny
from distar.run.build import check_inputs

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "distar"
pytestmark = pytest.mark.slow  # every test here talks to an S3 server the module starts
REGION = "us-east-1"
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


class S3Server:
    """`moto_server` in its own process group. Its first SETUP requests go unchecked: they create
    `distar`, allowed everything, and `outsider`, allowed nothing. Every later request must be
    signed by one of them."""

    SETUP = 5

    def __init__(self, root: Path, servers):
        self.endpoint, self.servers = f"http://127.0.0.1:{free_port()}", servers
        self.proc = servers.start([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", self.endpoint.rsplit(":", 1)[1]],
                                  root / "moto.log", env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.SETUP)})
        try:
            servers.wait(f"moto_server (see {root / 'moto.log'})", lambda: servers.answers(self.endpoint + "/moto-api/"), self.proc, timeout=30, every=0.2)
        except BaseException:
            self.stop()
            raise
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="distar")
        iam.put_user_policy(UserName="distar", PolicyName="everything", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.keys = {"distar": iam.create_access_key(UserName="distar")["AccessKey"]}
        iam.create_user(UserName="outsider")
        self.keys["outsider"] = iam.create_access_key(UserName="outsider")["AccessKey"]

    def env(self, user: str = "distar") -> dict[str, str]:
        """The usual AWS environment of a user of this server."""
        key = self.keys[user]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION,
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def client(self):
        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def upload_folder(self, folder: Path, prefix: str) -> None:
        s3 = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def keys_under(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self):
        self.servers.stop(self.proc, timeout=10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, servers):
    server = S3Server(tmp_path_factory.mktemp("s3"), servers)
    server.client().create_bucket(Bucket=BUCKET)
    server.client().put_object(Bucket=BUCKET, Key="prompts/train.txt", Body="\n".join(PROMPTS).encode())
    yield server
    server.stop()


@pytest.fixture
def as_user(s3, monkeypatch, tmp_path):
    """This process's AWS environment set to a user of the test server, with its own cache."""
    def become(user: str = "distar"):
        for name, value in s3.env(user).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))
    become()
    return become


def secrets_of(s3) -> list[str]:
    return [v for key in s3.keys.values() for v in (key["AccessKeyId"], key["SecretAccessKey"])]


def test_a_file_is_fetched_once_and_again_when_it_changes(s3, as_user, tmp_path):
    first = storage.fetch(f"s3://{BUCKET}/prompts/train.txt", "data.prompts")
    assert first.read_text().splitlines() == PROMPTS
    assert first.is_relative_to(tmp_path / "cache" / "s3" / BUCKET)
    stamp = first.stat().st_mtime_ns
    again = storage.fetch(f"s3://{BUCKET}/prompts/train.txt", "data.prompts")
    assert again == first and again.stat().st_mtime_ns == stamp  # the cached copy, not a new download

    s3.client().put_object(Bucket=BUCKET, Key="prompts/changing.txt", Body=b"one\n")
    old = storage.fetch(f"s3://{BUCKET}/prompts/changing.txt", "data.prompts")
    s3.client().put_object(Bucket=BUCKET, Key="prompts/changing.txt", Body=b"two\nthree\n")  # new ETag and size
    new = storage.fetch(f"s3://{BUCKET}/prompts/changing.txt", "data.prompts")
    assert new != old and new.read_text() == "two\nthree\n" and old.read_text() == "one\n"

    from distar.data import load_prompts

    assert load_prompts(f"s3://{BUCKET}/prompts/train.txt") == PROMPTS


def test_a_prefix_is_fetched_as_a_folder(s3, as_user, tmp_path):
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "model_index.json").write_text('{"a": 1}')
    (local / "unet" / "weights.bin").write_bytes(os.urandom(3000))
    s3.upload_folder(local, "models/folder")
    for uri in (f"s3://{BUCKET}/models/folder", f"s3://{BUCKET}/models/folder/"):
        got = storage.fetch(uri, "model.reference")
        assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == ["model_index.json", "unet/weights.bin"]
        assert (got / "unet" / "weights.bin").read_bytes() == (local / "unet" / "weights.bin").read_bytes()
    assert not list((tmp_path / "cache" / "s3" / BUCKET).glob("*.partial-*"))


def _fetch_in_child(uri: str) -> str:
    return str(storage.fetch(uri, "model.reference"))


def test_processes_of_a_node_share_one_download(s3, as_user, tmp_path):
    local = tmp_path / "shared"
    local.mkdir()
    for i in range(4):
        (local / f"part{i}.bin").write_bytes(os.urandom(200_000))
    s3.upload_folder(local, "models/shared")
    with multiprocessing.get_context("spawn").Pool(3) as pool:  # spawn: the children read the environment set here
        got = set(pool.map(_fetch_in_child, [f"s3://{BUCKET}/models/shared"] * 3))
    (folder,) = got
    assert sorted(p.name for p in Path(folder).iterdir()) == [f"part{i}.bin" for i in range(4)]
    assert sorted(p.name for p in Path(folder).parent.iterdir() if "shared" in p.name) == [Path(folder).name, Path(folder).name + ".lock"]


@pytest.mark.parametrize("user, uri, says", [
    ("distar", f"s3://{BUCKET}/prompts/missing.txt", f"data.prompts: s3://{BUCKET}/prompts/missing.txt: no such object, and no objects under it"),
    ("distar", "s3://no-such-bucket/prompts.txt", "data.prompts: s3://no-such-bucket/prompts.txt: bucket 'no-such-bucket' does not exist"),
    ("outsider", f"s3://{BUCKET}/prompts/train.txt", f"data.prompts: s3://{BUCKET}/prompts/train.txt: access denied"),
    ("outsider", f"s3://{BUCKET}/prompts/", f"data.prompts: s3://{BUCKET}/prompts/: access denied"),
    ("distar", "s3:///prompts.txt", "data.prompts: s3:///prompts.txt: names no bucket"),
])
def test_unusable_locations_name_what_is_wrong(s3, as_user, user, uri, says):
    as_user(user)
    with pytest.raises(UserError) as caught:
        storage.fetch(uri, "data.prompts")
    assert caught.value.message.startswith(says), str(caught.value)
    assert not any(secret in str(caught.value) for secret in secrets_of(s3))


@pytest.mark.parametrize("hostile", ["../../../../escape.txt", "/tmp/distar-abs-escape/x.txt", "unet/../../escape.txt"])
def test_a_key_that_would_land_outside_the_cache_is_refused(s3, as_user, tmp_path, hostile):
    """The cache names a folder's files by their keys under the prefix: a key whose name is
    absolute or climbs with '..' is refused before anything is downloaded, on every node."""
    prefix = f"hostile-{abs(hash(hostile))}"
    s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/model_index.json", Body=b"{}")
    s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{hostile}", Body=b"written where it should not be")
    with pytest.raises(UserError) as caught:
        storage.fetch(f"s3://{BUCKET}/{prefix}/", "model.reference", tmp_path / "deep" / "down" / "cache")
    assert str(caught.value).count("\n") == 0
    assert caught.value.message.startswith(f"model.reference: s3://{BUCKET}/{prefix}/{hostile}: ")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written, not even inside the cache
    assert not Path("/tmp/distar-abs-escape/x.txt").exists()


def test_bad_credentials_and_an_unreachable_store(s3, as_user, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAUSEROFTHIS")
    with pytest.raises(UserError, match=r"the store refused the credentials in use \(InvalidAccessKeyId\)"):
        storage.fetch(f"s3://{BUCKET}/prompts/train.txt", "data.prompts")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError, match="no AWS credentials found"):
        storage.fetch(f"s3://{BUCKET}/prompts/train.txt", "data.prompts")
    as_user("distar")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UserError, match=r"data.prompts: s3://distar/prompts/train.txt: EndpointConnectionError"):
        storage.fetch(f"s3://{BUCKET}/prompts/train.txt", "data.prompts")


def test_the_driver_checks_s3_sources_before_starting(s3, as_user):
    """A missing model fails at the driver's check, with nothing downloaded; a readable one passes."""
    s3.upload_folder(ROOT / "jobs" / "configs", "configs")  # any folder stands in for a model here
    check_inputs(load_config("jobs/configs/smoke.yaml", [f"model.reference=s3://{BUCKET}/configs", f"data.prompts=s3://{BUCKET}/prompts/train.txt"]))
    with pytest.raises(UserError, match=f"rewards.1.source: s3://{BUCKET}/models/nothing: no such object"):
        check_inputs(load_config("jobs/configs/smoke.yaml", [f"rewards.1.source=s3://{BUCKET}/models/nothing"]))
    as_user("outsider")
    with pytest.raises(UserError, match=f"model.reference: s3://{BUCKET}/configs: access denied"):
        check_inputs(load_config("jobs/configs/smoke.yaml", [f"model.reference=s3://{BUCKET}/configs"]))


def test_a_run_reads_from_checkpoints_to_and_logs_artifacts_to_s3(s3, tmp_path, jobs, new_mlflow_server, mlflow_client):
    """The whole path: reference and prompts from s3://, Ray Train checkpoints to s3://, a resumed
    run continuing from there, and MLflow artifacts in the bucket through the tracking server."""
    tiny.build_sd15_pipeline(tmp_path / "reference")
    s3.upload_folder(tmp_path / "reference", "models/tiny-sd15")
    server = new_mlflow_server(tmp_path, artifacts=("--artifacts-destination", f"s3://{BUCKET}/mlflow"),
                               env={**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint})
    env = {**os.environ, **s3.env(), "DISTAR_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance: its workers share this environment, as a node's processes do
    out = tmp_path / "out"
    sets = [f"model.reference=s3://{BUCKET}/models/tiny-sd15/", f"data.prompts=s3://{BUCKET}/prompts/train.txt",
            f"run.storage_path=s3://{BUCKET}/runs/smoke", f"run.output_dir={out}", "run.checkpoint_every=2", f"tracking.mlflow_uri={server.uri}"]

    def train(steps: int) -> str:
        args = [a for s in [*sets, f"run.steps={steps}"] for a in ("--set", s)]
        proc = jobs.run("train.py", "--config", "jobs/configs/smoke.yaml", *args, env=env)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
        return proc.stdout + proc.stderr

    try:
        first = train(2)
        assert re.findall(r"checkpoints/checkpoint_[\d-]+_[\d.-]+/", " ".join(s3.keys_under("runs/smoke/checkpoints/")))
        assert not (out / "checkpoints").exists()  # nothing went to the local folder
        second = train(4)
        assert "resuming from the checkpoint at step 2" in second
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        checkpoints = set(re.findall(r"checkpoints/(checkpoint_[\d-]+_[\d.-]+)/", " ".join(s3.keys_under("runs/smoke/checkpoints/"))))
        assert len(checkpoints) == 2, checkpoints  # num_to_keep

        # Every process of this node (driver, trainer, both pools) used one downloaded copy.
        cached = sorted(p.name for p in (tmp_path / "cache" / "s3" / BUCKET).iterdir() if p.is_dir())
        assert [n.rsplit("-", 1)[0] for n in cached] == ["tiny-sd15", "train.txt"], cached

        client = mlflow_client(server.uri)
        versions = client.search_model_versions("name='distar-generator'")
        assert len(versions) == 2
        stored = s3.keys_under("mlflow/")
        assert len([k for k in stored if k.endswith("/MLmodel")]) == 2, "each run's generator is in the bucket"
        for v in versions:
            run = client.get_run(v.run_id)
            assert any(v.run_id in k and k.endswith(".png") for k in stored), "the grids are in the bucket"
            (config,) = [k for k in stored if v.run_id in k and k.endswith("/config.yaml")]
            recorded = json.dumps([run.data.params, run.data.tags]) + s3.client().get_object(Bucket=BUCKET, Key=config)["Body"].read().decode()
            assert f"s3://{BUCKET}/models/tiny-sd15/" in recorded
            assert not any(secret in recorded for secret in secrets_of(s3))
        assert not any(secret in first + second for secret in secrets_of(s3))
    finally:
        server.stop()


def test_mlflow_clients_write_artifacts_to_s3_with_mlflow_s3_endpoint_url(s3, tmp_path, monkeypatch, register_toy_generator,
                                                                          new_mlflow_server, mlflow_client):
    """A tracking server that hands out s3:// artifact locations: the client itself uploads."""
    for name, value in {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(name, value)
    server = new_mlflow_server(tmp_path, artifacts=("--default-artifact-root", f"s3://{BUCKET}/direct", "--no-serve-artifacts"), env=dict(os.environ))
    try:
        version = register_toy_generator(server.uri)
        run = mlflow_client(server.uri).get_run(version.run_id)
    finally:
        server.stop()
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/direct/")
    stored = s3.keys_under("direct/")
    assert any(version.run_id in k and k.endswith("config.yaml") for k in stored), stored[:20]
    assert len([k for k in stored if k.endswith("/MLmodel")]) == 1  # the logged generator (MLflow 3 keeps models beside runs)
