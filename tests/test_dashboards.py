"""dashboards/: every query of the Grafana dashboards, and every metric of a run, finds data in a
real Prometheus started with the shipped dashboards/prometheus.yml, scraping a real Ray instance
(found through Ray's service-discovery file) while a toy run trains on it and a generator answers
good and bad HTTP requests on Serve. Plus the dashboards' structure, and proof that the check fails
for a metric nobody exports. The Ray instance is this module's own (RAY_TMPDIR set): the session's
writes its discovery file into the machine-wide /tmp/ray, which every other Ray instance
overwrites, and its Serve runs without an HTTP proxy once a training has started it."""

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from distar.cluster.session import free_port
from distar.run.timing import STEP_PARTS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
BOARDS = ("run.json", "serving.json")
SHIPPED_SD = "/tmp/ray/prom_metrics_service_discovery.json"
RUN = "dashboards-toy"  # the toy run's name: what the run dashboard's $run selects
APP = "distar"  # the Serve application of the generator endpoint: $application
STEPS = 8
RUN_METRICS = ["distar_step_time_s", "distar_samples_per_s", "distar_role_latency_s", "distar_pool_batch_size", "distar_reward", "distar_loss"]
SCRAPE = "2s"  # instead of the shipped interval, so that a short run leaves enough samples
BUILTINS = {"$__rate_interval": "20s", "$__interval": "2s"}  # Grafana's, as it fills them in at this scrape interval
GPU_METRICS = re.compile(r"\bray_node_(gpus|gram)_\w+")  # only nodes with GPUs export these
HAS_GPU = torch.cuda.is_available()


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def datasource_uid() -> str:
    (source,) = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    return source["uid"]


def queries() -> list:
    """pytest params: every panel target and every query variable of the shipped dashboards."""
    params = []
    for board in BOARDS:
        d = load(board)
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"]).groups()
                # The values Grafana offers include the one this test's run or app carries.
                params.append(pytest.param(board, f'count by ({label}) ({metric}{{{label}="${var["name"]}"}})', id=f"{board}:variable:{var['name']}"))
        for panel in d["panels"]:
            for target in panel.get("targets", []):
                slug = re.sub(r"\W+", "-", panel["title"]).strip("-").lower()
                gpu = GPU_METRICS.search(target["expr"])
                marks = [pytest.mark.skip(reason=f"no GPU on this machine ({gpu.group(0)} is exported by nodes with GPUs only)")] if gpu and not HAS_GPU else []
                params.append(pytest.param(board, target["expr"], id=f"{board}:{panel['id']}{target['refId']}:{slug}", marks=marks))
    return params


def substitute(expr: str, board: str, window_s: int) -> str:
    values = {**BUILTINS, "$__range": f"{window_s}s", "$run": RUN, "$application": APP}
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(name, values[name])
    assert "$" not in expr, f"{board}: a variable neither the dashboard nor the test defines: {expr}"
    return expr


# --- without Prometheus -------------------------------------------------------------------------


@pytest.mark.parametrize("board", BOARDS)
def test_dashboard_is_a_grafana_model_on_the_provisioned_datasource(board):
    d, uid = load(board), datasource_uid()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"] and d["id"] is None  # provisioned: Grafana assigns the id
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    defined = {v["name"] for v in d["templating"]["list"]}
    for var in d["templating"]["list"]:
        assert var.get("datasource", {"uid": uid})["uid"] == uid
    for panel in d["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == uid, panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= defined, f"{panel['title']}: undefined variables {used - defined}"
    # No two panels overlap on the grid.
    cells = [(x, y) for p in d["panels"] for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))


def test_provisioning_matches_the_prometheus_config(program):
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    (source,) = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert (source["name"], source["type"], source["url"]) == ("Prometheus", "prometheus", "http://prometheus:9090")
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]  # Grafana's $__rate_interval builds on it
    (provider,) = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/distar.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    (job,) = config["scrape_configs"]
    assert [f for sd in job["file_sd_configs"] for f in sd["files"]] == [SHIPPED_SD]
    promtool = program("promtool", "Debian's package: apt-get install prometheus")
    check = subprocess.run([promtool, "check", "config", str(DASHBOARDS / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# --- a Prometheus scraping a Ray instance that trains and serves --------------------------------


def prometheus_config(sd_file: Path) -> str:
    """The shipped config with only the discovery file and the scrape interval replaced."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = SCRAPE
    replaced = 0
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            replaced += sd["files"].count(SHIPPED_SD)
            sd["files"] = [str(sd_file) if f == SHIPPED_SD else f for f in sd["files"]]
    assert replaced == 1, "dashboards/prometheus.yml must read Ray's service-discovery file"
    return yaml.safe_dump(config)


class Prometheus:
    """`prometheus` (Debian's package) on 127.0.0.1, in its own process group."""

    def __init__(self, root: Path, config: str, servers, binary: str):
        (root / "prometheus.yml").write_text(config)
        self.url, self.servers = f"http://127.0.0.1:{free_port()}", servers
        self.proc = servers.start([binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
                                   f"--web.listen-address={self.url.removeprefix('http://')}"], root / "prometheus.log")
        try:
            servers.wait(f"prometheus (see {root / 'prometheus.log'})", lambda: servers.answers(f"{self.url}/-/ready"), self.proc, timeout=30, every=0.3)
        except BaseException:
            self.stop()
            raise

    def query(self, expr: str, start: float, end: float) -> list:
        """The series of a range query (what a Grafana time-series panel asks)."""
        r = requests.get(f"{self.url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": "2s"}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error', r.text[:500])}"
        return body["data"]["result"]

    def stop(self):
        self.servers.stop(self.proc, timeout=20)


def has_data(series: list) -> bool:
    """At least one finite value (a quantile of no requests is NaN: that is not data)."""
    return any(v not in ("NaN", "+Inf", "-Inf") for s in series for _, v in s["values"])


def requests_round(url: str) -> list[int]:
    """Three good requests and three bad ones (refused by validation, broken JSON, no such route)."""
    good = [requests.post(f"{url}/generate", json={"prompt": "a small red circle on the left", "seed": seed}, timeout=60).status_code
            for seed in range(3)]
    return good + [requests.post(f"{url}/generate", json={"prompt": ""}, timeout=30).status_code,
                   requests.post(f"{url}/generate", data="{broken", headers={"Content-Type": "application/json"}, timeout=30).status_code,
                   requests.get(f"{url}/no/such/path", timeout=30).status_code]


def serve_generator(root: Path, cluster, model: Path, servers):
    """`serve run` of the generator app on a free port, with Serve's HTTP proxy; (process, url)."""
    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": APP, "route_prefix": "/", "import_path": "distar.serving:app",
                                "args": {"model": str(model), "num_cpus": 0.5, "max_batch_size": 4}}]}
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    proc = servers.start([str(Path(sys.executable).parent / "serve"), "run", str(root / "serve.yaml")], root / "serve_run.log", cluster.run_env, root)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_pipeline, servers, new_ray_cluster, jobs, program):
    """Prometheus with the scraped data of: a toy run of STEPS steps (pools on Serve, a Ray Train
    worker), and a generator app on Serve's HTTP proxy that answered good and bad requests.
    Yields (prometheus, start, end): the time window in which it all happened."""
    binary = program("prometheus", "Debian's package: apt-get install prometheus")
    root = tmp_path_factory.mktemp("dashboards")
    # A Ray temp dir of this module's own, short: Ray's socket paths in it must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dsh", dir="/tmp"))
    cluster = prom = serving = None
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_TMPDIR", str(ray_tmp))
            cluster = new_ray_cluster(root)
        sd_file = ray_tmp / "ray" / "prom_metrics_service_discovery.json"  # the symlink Ray keeps at its temp dir's root
        servers.wait("Ray's service-discovery file", sd_file.is_file, cluster.proc, timeout=30)
        prom = Prometheus(root, prometheus_config(sd_file), servers, binary)
        start = time.time() - 5
        # The generator endpoint first: Serve keeps the HTTP proxy of whoever starts it, and the
        # training's pools start it without one. A tiny pipeline (a diffusion model) stands in.
        serving, url = serve_generator(root, cluster, tiny_pipeline, servers)
        servers.wait("the generator endpoint", lambda: servers.answers(f"{url}/healthz"), serving, timeout=180, every=1)
        train = jobs.run("train.py", "--config", "jobs/configs/smoke.yaml", "--set", f"run.output_dir={root / 'run'}",
                         "--set", f"run.name={RUN}", "--set", f"run.steps={STEPS}", env=cluster.run_env, timeout=300)
        assert train.returncode == 0, (train.stdout[-3000:], train.stderr[-3000:])

        def errors() -> float:
            found = prom.query(f'sum(ray_serve_num_http_error_requests_total{{application="{APP}"}})', start, time.time())
            return float(found[0]["values"][-1][1]) if found else 0.0

        # Two rounds: a series that appears with its final count shows no increase, so rates and
        # latency quantiles need samples from before the requests they count.
        assert requests_round(url) == [200] * 3 + [422, 400, 404]
        servers.wait("the first requests in Prometheus", lambda: errors() >= 3, prom.proc, timeout=30, every=1)
        assert requests_round(url) == [200] * 3 + [422, 400, 404]

        # Until Prometheus holds the last step and the last error: Ray's processes report every
        # second here (RayCluster), Prometheus scrapes every SCRAPE.
        def scraped_all() -> bool:
            steps = prom.query(f'max(ray_distar_step_time_s_count{{run="{RUN}"}})', start, time.time())
            return bool(steps) and float(steps[0]["values"][-1][1]) == STEPS and errors() >= 6

        servers.wait("the run's and the endpoint's metrics in Prometheus", scraped_all, prom.proc, timeout=60, every=2)
        time.sleep(4)  # two more scrapes: the rates' windows end after the last sample
        yield prom, start, time.time()
    finally:
        for server in (cluster, prom):  # the app goes with its cluster: serve run, left with nothing to shut down, is killed
            if server is not None:
                server.stop()
        if serving is not None and serving.poll() is None:
            servers.stop(serving, timeout=10, sig=signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("board, expr", queries())
def test_query_finds_data(scraped, board, expr):
    prom, start, end = scraped
    query = substitute(expr, board, int(end - start) + 1)
    series = []
    for _ in range(3):  # bounded: the data is there already unless a panel is wrong
        series = prom.query(query, start, end)
        if has_data(series):
            break
        time.sleep(1)
    assert has_data(series), f"no data: {query}\n{json.dumps(series)[:500]}"


@pytest.mark.slow
def test_step_parts_add_up_to_the_step_time(scraped):
    """distar_step_part_s: the seconds of every part but the loop's own work between steps, added up
    over the run, are the run's step time. Ray exports histograms by bucket (their _sum from bucket
    midpoints), so the step time's own total is known only within its buckets' bounds: the parts'
    total must lie within them."""
    prom, start, end = scraped

    def last(expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["values"][-1][1]) for s in prom.query(expr, start, end)}

    parts = last(f'sum by (part) (ray_distar_step_part_s_total{{run="{RUN}"}})', "part")
    assert {"generator_forward", "fake_forward", "reward", "reference", "fake_score_update", "generator_update", "loop"} <= set(parts) <= set(STEP_PARTS)
    assert all(v > 0 for v in parts.values())
    cumulative = sorted((float(le), n) for le, n in last(f'sum by (le) (ray_distar_step_time_s_bucket{{run="{RUN}"}})', "le").items())
    assert cumulative[-1] == (float("inf"), STEPS)
    low = high = 0.0
    for (lower, below), (upper, upto) in zip([(0.0, 0.0), *cumulative], cumulative):
        if upto > below:  # steps in (lower, upper]
            low, high = low + (upto - below) * lower, high + (upto - below) * upper
    in_steps = sum(v for part, v in parts.items() if part != "loop")
    assert low <= in_steps <= high, (low, in_steps, high, parts)


@pytest.mark.slow
def test_every_run_metric_reaches_prometheus_with_its_labels(scraped):
    """Ray exports the run's metrics at each node's metrics port, where Prometheus scrapes them."""
    prom, start, end = scraped
    def values(expr: str, label: str) -> set[str]:
        return {s["metric"].get(label) for s in prom.query(expr, start, end)}

    names = " ".join(values('group by (__name__) ({__name__=~"ray_distar_.+"})', "__name__"))
    assert {m for m in RUN_METRICS if f"ray_{m}" in names} == set(RUN_METRICS), names
    assert values(f'ray_distar_role_latency_s_count{{run="{RUN}"}}', "role") == {"reward", "reference"}
    assert values(f'ray_distar_reward{{run="{RUN}"}}', "model") == {"pickscore", "clip_score"}


@pytest.mark.slow
def test_query_of_a_metric_nobody_exports_finds_no_data(scraped):
    """The check above can fail: a panel with a misspelt metric or label value has no data."""
    prom, start, end = scraped
    panel = {"targets": [{"refId": "A", "expr": 'sum by (run) (rate(ray_distar_no_such_metric_count{run=~"$run"}[$__rate_interval]))'},
                         {"refId": "B", "expr": 'sum by (run) (rate(ray_distar_step_time_s_count{run=~"$run-misspelt"}[$__rate_interval]))'}]}
    for target in panel["targets"]:
        assert not has_data(prom.query(substitute(target["expr"], "negative", int(end - start) + 1), start, end))
    # ...while the same query with the right name finds it.
    assert has_data(prom.query(substitute('sum by (run) (rate(ray_distar_step_time_s_count{run=~"$run"}[$__rate_interval]))', "positive", 60), start, end))


def test_substitution_leaves_no_variable():
    assert substitute('rate(x{run=~"$run", application=~"$application"}[$__rate_interval]) + increase(x[$__range])', "b", 90) == \
        f'rate(x{{run=~"{RUN}", application=~"{APP}"}}[20s]) + increase(x[90s])'
    with pytest.raises(AssertionError, match="neither the dashboard nor the test"):
        substitute('x{node=~"$node"}', "b", 90)

