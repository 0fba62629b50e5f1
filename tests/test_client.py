"""`submit` / `schedule` against a fake KFP v2beta1 REST API on 127.0.0.1.

Nothing of kfp is mocked: the real `kfp.Client` (and its generated `kfp_server_api`) talks
HTTP to `FakeKFP`, a small threaded server that implements only the endpoints kfp 2.17 calls
for these commands, enforces the bearer token, records every request (JSON bodies and
multipart uploads decoded) and answers 404 to anything else — an unexpected call fails the test.

Calls kfp.Client 2.17 makes (read from kfp/client/client.py and kfp_server_api):
  Client(...) with no namespace        GET  /apis/v2beta1/healthz          (multi-user check)
  create_experiment / get_experiment   GET  /apis/v2beta1/experiments?filter=…[&namespace=]
                                       POST /apis/v2beta1/experiments       (when missing)
  create_run_from_pipeline_package     POST /apis/v2beta1/runs              (spec inline)
  list_pipelines (pipeline lookup)     GET  /apis/v2beta1/pipelines?filter=…
  upload_pipeline                      POST /apis/v2beta1/pipelines/upload?name=…  (multipart "uploadfile")
  list_pipeline_versions               GET  /apis/v2beta1/pipelines/{id}/versions
  upload_pipeline_version              POST /apis/v2beta1/pipelines/upload_version?name=…&pipelineid=…
  create_recurring_run                 POST /apis/v2beta1/recurringruns
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from components.config import load_config, run_time_parameters
from pipelines import cli
from pipelines.client import schedule, submit
from pipelines.pipeline import compile_pipeline
from pipelines.plan import algorithm1
from tests.conftest import send_json

API = "/apis/v2beta1"
TOKEN = "test-token"
SECRET = "planted-S3cret-7f3a9c-never-send"  # planted in the credential env vars below
CREDENTIAL_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
                   "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_USERNAME")
KFP_VARS = ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
            "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_SA_TOKEN_PATH",
            "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
            "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET")
PARAMS = {"tracking_uri", "init_policy_uri", "init_reward_uri"}  # + the run-time settings (pipeline.py)
CHAMPION = {"init_policy_uri": "models:/kfp-grpo-policy@champion",
            "init_reward_uri": "models:/kfp-grpo-reward@champion"}
SCRATCH = {"init_policy_uri": "", "init_reward_uri": ""}


# --------------------------------------------------------------------------- the fake KFP API

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any = None
    form: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)  # multipart: name -> (filename, data)

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert msg.is_multipart(), "multipart body does not parse"
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in msg.iter_parts()}


def _error(status: int, grpc_code: int, message: str) -> tuple[int, dict]:
    return status, {"error": message, "code": grpc_code, "message": message, "details": []}


class FakeKFP:
    """Just enough of the KFP v2beta1 REST API, with in-memory state and a request log."""

    def __init__(self, token: str = TOKEN, multi_user: bool = False):
        self.token, self.multi_user = token, multi_user
        self.requests: list[Request] = []
        self.unexpected: list[str] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions, oldest first
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.routes = [
            ("GET", rf"{API}/healthz", self.healthz),
            ("GET", rf"{API}/experiments", self.list_experiments),
            ("POST", rf"{API}/experiments", self.create_experiment),
            ("POST", rf"{API}/runs", self.create_run),
            ("GET", rf"{API}/runs/([^/:]+)", self.get_run),
            ("GET", rf"{API}/pipelines", self.list_pipelines),
            ("POST", rf"{API}/pipelines/upload", self.upload_pipeline),
            ("POST", rf"{API}/pipelines/upload_version", self.upload_pipeline_version),
            ("GET", rf"{API}/pipelines/([^/:]+)/versions", self.list_pipeline_versions),
            ("POST", rf"{API}/recurringruns", self.create_recurring_run),
        ]
        handler = type("Handler", (_Handler,), {"fake": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeKFP":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # ---- helpers
    def _new(self, prefix: str) -> tuple[str, str]:
        n = next(self._ids)
        at = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=n)
        return f"{prefix}-{n:04d}", at.strftime("%Y-%m-%dT%H:%M:%SZ")

    @staticmethod
    def _display_name_filter(req: Request) -> str | None:
        """The `display_name EQUALS x` filter kfp builds; anything else is a 400 (not what we expect)."""
        if "filter" not in req.query:
            return None
        (pred,) = json.loads(req.query["filter"])["predicates"]
        if pred.get("operation") not in (1, "EQUALS") or pred.get("key") != "display_name":
            raise ValueError(f"unsupported filter {pred}")
        return pred["stringValue"]

    @staticmethod
    def _in_namespace(obj: dict, req: Request) -> bool:
        """As on a multi-user KFP: no namespace lists the shared (namespace-less) objects only."""
        return obj.get("namespace", "") == req.query.get("namespace", "")

    @staticmethod
    def _parse_package(data: bytes) -> list[dict]:
        docs = list(yaml.safe_load_all(data))
        if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
            raise ValueError("not a compiled KFP pipeline")
        return docs

    def seed_experiment(self, name: str, namespace: str = "") -> str:
        eid, at = self._new("exp")
        self.experiments[eid] = {"experiment_id": eid, "display_name": name, "namespace": namespace,
                                 "created_at": at, "storage_state": "AVAILABLE"}
        return eid

    def routes_called(self) -> list[str]:
        return [r.route for r in self.requests]

    def last(self, route: str) -> Request:
        return [r for r in self.requests if r.route == route][-1]

    # ---- endpoints
    def dispatch(self, req: Request) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(req)
            if req.headers.get("authorization") != f"Bearer {self.token}":
                return _error(401, 16, "Unauthorized: missing or invalid bearer token")
            for method, pattern, endpoint in self.routes:
                m = re.fullmatch(pattern, req.path)
                if req.method == method and m:
                    try:
                        return endpoint(req, *m.groups())
                    except (ValueError, KeyError, TypeError) as err:
                        return _error(400, 3, f"bad request: {err}")
            self.unexpected.append(req.route)
            return _error(404, 5, f"the fake KFP API has no {req.route}")

    def healthz(self, req):
        return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}

    def list_experiments(self, req):
        name = self._display_name_filter(req)
        found = [e for e in self.experiments.values()
                 if (name is None or e["display_name"] == name) and self._in_namespace(e, req)]
        return 200, ({"experiments": found, "total_size": len(found)} if found else {})  # grpc-gateway drops empties

    def create_experiment(self, req):
        body = req.json
        if not body.get("display_name"):
            return _error(400, 3, "experiment display_name is empty")
        if any(e["display_name"] == body["display_name"] and e["namespace"] == body.get("namespace", "")
               for e in self.experiments.values()):
            return _error(409, 6, f"experiment {body['display_name']!r} already exists")
        eid = self.seed_experiment(body["display_name"], body.get("namespace", ""))
        return 200, self.experiments[eid]

    def create_run(self, req):
        body = req.json
        if body.get("experiment_id") not in self.experiments:
            return _error(404, 5, f"experiment {body.get('experiment_id')!r} not found")
        if not body.get("pipeline_spec") and not body.get("pipeline_version_reference"):
            return _error(400, 3, "a run needs pipeline_spec or pipeline_version_reference")
        rid, at = self._new("run")
        self.runs[rid] = {**body, "run_id": rid, "created_at": at, "state": "PENDING", "storage_state": "AVAILABLE"}
        return 200, self.runs[rid]

    final_state = "SUCCEEDED"  # what a run reports from its second poll on (`submit --wait`)

    def get_run(self, req, rid):
        if rid not in self.runs:
            return _error(404, 5, f"run {rid!r} not found")
        run = self.runs[rid]
        run["state"] = "RUNNING" if run["state"] == "PENDING" else self.final_state
        return 200, run

    def list_pipelines(self, req):
        name = self._display_name_filter(req)
        found = [p for p in self.pipelines.values()
                 if (name is None or p["display_name"] == name) and self._in_namespace(p, req)]
        return 200, ({"pipelines": found, "total_size": len(found)} if found else {})

    def _add_version(self, pid: str, name: str, spec: list[dict]) -> dict:
        vid, at = self._new("ver")
        version = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name, "name": name,
                   "created_at": at, "pipeline_spec": spec[0]}
        self.versions[pid].append(version)
        return version

    def upload_pipeline(self, req):
        name = req.query["name"]
        filename, data = req.form["uploadfile"]
        spec = self._parse_package(data)
        ns = req.query.get("namespace", "")
        if any(p["display_name"] == name and p["namespace"] == ns for p in self.pipelines.values()):
            return _error(409, 6, f"pipeline {name!r} already exists")
        pid, at = self._new("pipe")
        self.pipelines[pid] = {"pipeline_id": pid, "display_name": name, "name": name, "namespace": ns,
                               "created_at": at}
        self.versions[pid] = []
        self._add_version(pid, name, spec)  # the server creates the first version itself
        return 200, self.pipelines[pid]

    def upload_pipeline_version(self, req):
        pid, name = req.query["pipelineid"], req.query["name"]
        spec = self._parse_package(req.form["uploadfile"][1])
        if pid not in self.pipelines:
            return _error(404, 5, f"pipeline {pid!r} not found")
        if any(v["display_name"] == name for v in self.versions[pid]):  # unique per pipeline, as on KFP
            return _error(409, 6, f"pipeline version {name!r} already exists")
        return 200, self._add_version(pid, name, spec)

    def list_pipeline_versions(self, req, pid):
        if pid not in self.pipelines:
            return _error(404, 5, f"pipeline {pid!r} not found")
        versions = list(self.versions[pid])
        if req.query.get("sort_by", "").replace(" ", "") == "created_atdesc":
            versions.reverse()
        return 200, {"pipeline_versions": versions, "total_size": len(versions)}

    def create_recurring_run(self, req):
        body = req.json
        if body.get("experiment_id") not in self.experiments:
            return _error(404, 5, f"experiment {body.get('experiment_id')!r} not found")
        cron = body["trigger"]["cron_schedule"]["cron"]
        if len(cron.split()) != 6:  # the backend parses with robfig/cron, seconds first
            return _error(400, 3, f"invalid cron {cron!r}")
        ref = body.get("pipeline_version_reference") or {}
        if not any(v["pipeline_version_id"] == ref.get("pipeline_version_id")
                   for v in self.versions.get(ref.get("pipeline_id"), [])):
            return _error(404, 5, f"pipeline version {ref} not found")
        jid, at = self._new("job")
        self.recurring_runs[jid] = {**body, "recurring_run_id": jid, "created_at": at, "updated_at": at,
                                    "status": "ENABLED"}
        return 200, self.recurring_runs[jid]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKFP

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(self.command, url.path,
                      {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
                      {k.lower(): v for k, v in self.headers.items()}, body)
        ctype = req.headers.get("content-type", "")
        if body and ctype.startswith("application/json"):
            req.json = json.loads(body)
        elif ctype.startswith("multipart/form-data"):
            req.form = _multipart(ctype, body)
        send_json(self, *self.fake.dispatch(req))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ambient KFP settings; secrets planted in the credential variables a user would have set."""
    import kfp.client.client as kfp_client

    for var in KFP_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in CREDENTIAL_VARS:
        monkeypatch.setenv(var, SECRET)
    # kfp reads ~/.config/kfp/context.json (namespace, cookies); keep a developer's file out of the test
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture
def fake():
    """The fake API; afterwards, in every test: no unexpected call, the bearer token on every request,
    and none of the credentials planted in the environment (see `clean_env`) in any request."""
    with FakeKFP() as server:
        yield server
    assert server.unexpected == [], f"calls the fake does not implement: {server.unexpected}"
    assert {r.headers.get("authorization") for r in server.requests} <= {f"Bearer {server.token}"}
    assert not any("cookie" in r.headers for r in server.requests)
    no_secret_anywhere(server)


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(None)  # the embedded default (pipelines/configs/tiny.yaml), as the CLI uses it


@pytest.fixture(scope="module")
def compiled(tiny_cfg, tmp_path_factory) -> list[dict]:
    """The IR documents `kfp-grpo compile` writes for the default config: [pipeline spec, platform spec]."""
    path = compile_pipeline(tiny_cfg, str(tmp_path_factory.mktemp("ir") / "pipeline.yaml"))
    with open(path) as f:
        return list(yaml.safe_load_all(f))


# --------------------------------------------------------------------------- assertions

def assert_is_our_pipeline(spec: dict) -> None:
    assert spec["pipelineInfo"]["name"] == "kfp-grpo-tiny"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == PARAMS | set(run_time_parameters(load_config()))
    tasks = spec["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    # the plan of tiny.yaml, unrolled at compile time, plus start-tracking
    assert names == {t.name for t in algorithm1(load_config())} | {"start-tracking"}
    assert not [k for k, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")], "caching must be off"


def assert_run_spec(body_spec: dict, compiled: list[dict]) -> None:
    """The inline spec of a run: our IR plus the kubernetes platform spec, exactly as compiled."""
    assert set(body_spec) == {"pipeline_spec", "platform_spec"}
    assert_is_our_pipeline(body_spec["pipeline_spec"])
    assert body_spec["pipeline_spec"] == compiled[0]
    assert body_spec["platform_spec"] == compiled[1]
    executors = body_spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert any(e.get("secretAsEnv") for e in executors.values())  # MLflow credentials come from a k8s Secret


def no_secret_anywhere(server: FakeKFP) -> None:
    for r in server.requests:
        blobs = [r.path.encode(), json.dumps(r.query).encode(), json.dumps(r.headers).encode(), r.body]
        blobs += [data for _, data in r.form.values()]
        assert not any(SECRET.encode() in b for b in blobs), f"{r.route} carried a credential from the environment"


# --------------------------------------------------------------------------- submit

def test_submit_creates_experiment_and_run_with_the_compiled_pipeline(fake, tiny_cfg, compiled):
    run = submit(tiny_cfg, host=fake.host, token=TOKEN, experiment="grpo-exp",
                 tracking_uri="http://mlflow.kfp-grpo.svc:5000")
    run_id = run["run_id"]
    assert run == {"run_id": run_id, "url": f"{fake.host}/#/runs/details/{run_id}"}  # the KFP UI's run page

    assert fake.routes_called() == [f"GET {API}/healthz", f"GET {API}/experiments",
                                    f"POST {API}/experiments", f"POST {API}/runs"]
    lookup = fake.last(f"GET {API}/experiments")
    assert json.loads(lookup.query["filter"])["predicates"][0]["stringValue"] == "grpo-exp"
    assert fake.last(f"POST {API}/experiments").json["display_name"] == "grpo-exp"
    (exp_id,) = fake.experiments

    run = fake.last(f"POST {API}/runs")
    assert run.headers["content-type"].startswith("application/json")
    body = run.json
    assert run_id == next(iter(fake.runs)) and run_id.startswith("run-")
    assert body["experiment_id"] == exp_id
    assert body["display_name"] == "kfp-grpo-tiny"  # run name defaults to the config name
    assert body["service_account"] == "kfp-grpo-pipeline"  # cfg.cluster.service_account
    assert body["runtime_config"]["parameters"] == {"tracking_uri": "http://mlflow.kfp-grpo.svc:5000", **SCRATCH}
    assert "pipeline_version_reference" not in body  # the spec travels inline
    assert_run_spec(body["pipeline_spec"], compiled)


def test_submit_cli_from_champion_reuses_the_experiment(fake, compiled, capsys):
    exp_id = fake.seed_experiment("kfp-grpo")

    rc = cli.main(["submit", "--host", fake.host, "--token", TOKEN, "--from-champion", "--run-name", "nightly",
                   "--tracking-uri", "http://mlflow:5000"])

    assert rc == 0
    assert fake.routes_called() == [f"GET {API}/healthz", f"GET {API}/experiments", f"POST {API}/runs"]
    body = fake.last(f"POST {API}/runs").json
    assert body["experiment_id"] == exp_id
    assert body["display_name"] == "nightly"
    assert body["runtime_config"]["parameters"] == {"tracking_uri": "http://mlflow:5000", **CHAMPION}
    assert body["service_account"] == "kfp-grpo-pipeline"
    assert_run_spec(body["pipeline_spec"], compiled)
    (run_id,) = fake.runs
    assert f"submitted run {run_id}: {fake.host}/#/runs/details/{run_id}" in capsys.readouterr().out


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_wait_exits_with_the_runs_outcome(fake, capsys, monkeypatch, final, code):
    from pipelines import client

    monkeypatch.setattr(client, "POLL_S", 0.1)
    fake.final_state = final
    rc = cli.main(["submit", "--host", fake.host, "--token", TOKEN, "--wait", "--output", "json"])
    assert rc == code
    (run_id,) = fake.runs
    result = json.loads(capsys.readouterr().out)
    assert result == {"run_id": run_id, "url": f"{fake.host}/#/runs/details/{run_id}", "state": final}
    assert fake.routes_called().count(f"GET {API}/runs/{run_id}") == 2  # polled until it finished


def test_submit_cli_namespace_and_service_account(fake):
    rc = cli.main(["submit", "--host", fake.host, "--token", TOKEN, "--namespace", "team-a",
                   "--experiment", "grpo-a", "--service-account", "team-a-runner",
                   "--init-policy-uri", "models:/mine/3"])

    assert rc == 0
    # with a namespace, kfp.Client skips the multi-user healthz probe
    assert fake.routes_called() == [f"GET {API}/experiments", f"POST {API}/experiments", f"POST {API}/runs"]
    assert fake.last(f"GET {API}/experiments").query["namespace"] == "team-a"
    exp = fake.last(f"POST {API}/experiments").json
    assert exp == {"display_name": "grpo-a", "namespace": "team-a"}
    body = fake.last(f"POST {API}/runs").json
    assert body["service_account"] == "team-a-runner"
    assert body["runtime_config"]["parameters"] == {"tracking_uri": "", "init_policy_uri": "models:/mine/3",
                                                    "init_reward_uri": ""}


# --------------------------------------------------------------------------- schedule

def test_schedule_uploads_the_pipeline_then_new_versions(fake, tiny_cfg, compiled):
    job_id = schedule(tiny_cfg, host=fake.host, token=TOKEN, tracking_uri="http://mlflow:5000")

    assert fake.routes_called() == [
        f"GET {API}/healthz", f"GET {API}/pipelines", f"POST {API}/pipelines/upload",
        f"GET {API}/pipelines/pipe-0001/versions", f"GET {API}/experiments", f"POST {API}/experiments",
        f"POST {API}/recurringruns"]
    lookup = json.loads(fake.last(f"GET {API}/pipelines").query["filter"])["predicates"][0]
    assert (lookup["key"], lookup["stringValue"]) == ("display_name", "kfp-grpo-tiny")
    upload = fake.last(f"POST {API}/pipelines/upload")
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert upload.query["name"] == "kfp-grpo-tiny"
    filename, data = upload.form["uploadfile"]
    assert filename.endswith(".yaml")
    uploaded = list(yaml.safe_load_all(data))
    assert uploaded == compiled
    assert_is_our_pipeline(uploaded[0])
    (pid,) = fake.pipelines
    (first_version,) = fake.versions[pid]
    (exp_id,) = fake.experiments
    assert fake.experiments[exp_id]["display_name"] == "kfp-grpo"

    body = fake.last(f"POST {API}/recurringruns").json
    assert job_id == next(iter(fake.recurring_runs))
    assert body["experiment_id"] == exp_id
    assert body["display_name"] == "kfp-grpo-tiny-retrain"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {"pipeline_id": pid,
                                                  "pipeline_version_id": first_version["pipeline_version_id"]}
    assert "pipeline_spec" not in body  # runs from the uploaded version
    assert body["runtime_config"]["parameters"] == {"tracking_uri": "http://mlflow:5000", **CHAMPION}
    assert body["service_account"] == "kfp-grpo-pipeline"

    # the pipeline now exists: each further call uploads a new version of it (names are unique per pipeline)
    for i in (2, 3):
        fake.requests.clear()
        job_id = schedule(tiny_cfg, host=fake.host, token=TOKEN, job_name=f"retrain-{i}", max_concurrency=i)
        assert fake.routes_called() == [
            f"GET {API}/healthz", f"GET {API}/pipelines", f"POST {API}/pipelines/upload_version",
            f"GET {API}/experiments", f"POST {API}/recurringruns"]
        upload = fake.last(f"POST {API}/pipelines/upload_version")
        assert upload.query["pipelineid"] == pid
        assert upload.query["name"].startswith(f"kfp-grpo-tiny-{tiny_cfg.hash()}")
        assert list(yaml.safe_load_all(upload.form["uploadfile"][1])) == compiled
        body = fake.last(f"POST {API}/recurringruns").json
        assert body["pipeline_version_reference"] == {
            "pipeline_id": pid, "pipeline_version_id": fake.versions[pid][-1]["pipeline_version_id"]}
        assert body["experiment_id"] == exp_id and body["display_name"] == f"retrain-{i}"
        assert body["max_concurrency"] == i
        assert job_id == list(fake.recurring_runs)[-1]
    assert len(fake.pipelines) == 1 and len(fake.versions[pid]) == 3 and len(fake.experiments) == 1
    assert len({v["display_name"] for v in fake.versions[pid]}) == 3


def test_schedule_cli_from_scratch(fake, capsys):
    rc = cli.main(["schedule", "--host", fake.host, "--token", TOKEN, "--from-scratch", "--experiment", "nightly",
                   "--cron", "0 30 3 * * 1-5", "--max-concurrency", "2", "--job-name", "weekday-retrain"])

    assert rc == 0
    body = fake.last(f"POST {API}/recurringruns").json
    assert body["runtime_config"]["parameters"] == {"tracking_uri": "", **SCRATCH}
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * 1-5"
    assert body["max_concurrency"] == 2 and body["no_catchup"] is True
    assert body["display_name"] == "weekday-retrain"
    assert [e["display_name"] for e in fake.experiments.values()] == ["nightly"]
    (job_id,) = fake.recurring_runs
    assert f"created recurring run {job_id} (0 30 3 * * 1-5, max concurrency 2, no catch-up)" in capsys.readouterr().out


def test_schedule_rejects_a_5_field_cron_before_any_request(fake, tiny_cfg, capsys):
    with pytest.raises(ValueError, match="6 fields"):
        schedule(tiny_cfg, host=fake.host, token=TOKEN, cron="0 2 * * *")

    rc = cli.main(["schedule", "--host", fake.host, "--token", TOKEN, "--cron", "0 2 * * *"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "6 fields" in err and "'0 2 * * *'" in err
    assert fake.requests == []


# --------------------------------------------------------------------------- credentials

def test_no_credentials_leave_the_machine(fake):
    """MLflow/S3 secrets in the submitter's environment never reach the KFP API (pods get them from a
    Secret). The `fake` fixture checks this after every test; here both commands, and the check run
    explicitly, so that a broken check cannot pass silently."""
    assert cli.main(["submit", "--host", fake.host, "--token", TOKEN, "--tracking-uri", "http://mlflow:5000"]) == 0
    assert cli.main(["schedule", "--host", fake.host, "--token", TOKEN, "--from-scratch"]) == 0
    assert {r.route for r in fake.requests} >= {f"POST {API}/runs", f"POST {API}/pipelines/upload",
                                               f"POST {API}/recurringruns"}
    no_secret_anywhere(fake)
    leaky = fake.last(f"POST {API}/runs")
    leaky.body += SECRET.encode()
    with pytest.raises(AssertionError, match="carried a credential"):
        no_secret_anywhere(fake)
    leaky.body = leaky.body[:-len(SECRET)]


def test_schedule_in_a_namespace_finds_its_own_pipeline(fake, tiny_cfg):
    """Multi-user KFP: the pipeline uploaded into a namespace is found there on the next call."""
    for _ in range(2):
        schedule(tiny_cfg, host=fake.host, token=TOKEN, namespace="team-a")
    assert f"GET {API}/healthz" not in fake.routes_called()
    uploads = [r for r in fake.requests if r.route.startswith(f"POST {API}/pipelines/upload")]
    assert [r.path.rsplit("/", 1)[1] for r in uploads] == ["upload", "upload_version"]
    assert uploads[0].query["namespace"] == "team-a"
    assert [r.query.get("namespace") for r in fake.requests if r.route == f"GET {API}/pipelines"] == ["team-a"] * 2
    (pipeline,) = fake.pipelines.values()
    assert pipeline["namespace"] == "team-a" and len(fake.versions[pipeline["pipeline_id"]]) == 2
    (exp,) = fake.experiments.values()
    assert exp["namespace"] == "team-a"


# --------------------------------------------------------------------------- auth and errors

def test_service_account_token_file_is_used_with_an_explicit_host(tmp_path, monkeypatch):
    """In a pod: no --token, the projected token at $KF_PIPELINES_SA_TOKEN_PATH is the bearer."""
    from pipelines.client import _client

    token_file = tmp_path / "token"
    token_file.write_text("projected-sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    with FakeKFP(token="projected-sa-token") as pod, FakeKFP(token="explicit") as other:
        _client(pod.host, None, None).list_experiments()  # constructing the client probes GET /healthz
        _client(other.host, "explicit", None).list_experiments()  # --token wins over the file
    for server in (pod, other):
        assert [r.route for r in server.requests] == [f"GET {API}/healthz", f"GET {API}/experiments"]
        assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {server.token}"}


def test_api_errors_are_one_line(fake, capsys):
    # a wrong token: 401 (with --namespace, kfp skips its healthz probe, which would retry 5 × 5 s)
    rc = cli.main(["submit", "--host", fake.host, "--token", "wrong", "--namespace", "team-a"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"error: the KFP API at {fake.host} answered 401") and "Unauthorized" in err
    assert "wrong" not in err
    fake.requests.clear()  # (they carried the wrong token on purpose)

    # nothing listening
    with FakeKFP() as gone:
        host = gone.host
    rc = cli.main(["schedule", "--host", host, "--token", TOKEN])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith(f"error: cannot reach the KFP API at {host}")
