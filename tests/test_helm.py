"""The Helm chart (helm/kfp-grpo), checked without a cluster.

The chart is rendered, linted and schema-checked by the real Helm engine (Helm v4's Go
library, embedded by helm-python-sdk), and every rendered manifest is validated against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail). Then
the properties the chart promises are asserted on the rendered objects: no credential
in plain text, non-root pods without privilege escalation, limits and probes, least
privilege RBAC, NetworkPolicies, and names that match the pipeline config.
"""

from __future__ import annotations

import base64
import re
import textwrap
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kfp-grpo"
RELEASE = "kfp-grpo"
NAMESPACE = "kubeflow"
K8S_VERSIONS = ("1.27.0", "1.30.0", kubernetes_validate.latest_version())

PRODUCTION = yaml.safe_load((CHART / "values-production.yaml").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

# Value sets that reach every branch of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": PRODUCTION,
    # bundled database, external bucket reached with ambient credentials (IRSA)
    "irsa": {
        "minio": {"enabled": False},
        "externalS3": {"endpoint": "https://s3.us-east-1.amazonaws.com", "region": "us-east-1"},
        "mlflow": {"serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mlflow"}}},
    },
    # everything optional switched off, credentials from the user's own Secrets
    "minimal": {
        "mlflow": {"auth": {"enabled": False}},
        "postgresql": {"auth": {"existingSecret": "my-pg"}},
        "minio": {"auth": {"existingSecret": "my-s3"}},
        "pipeline": {"createSecret": False, "rbac": {"create": False}},
        "setup": {"enabled": False},
        "networkPolicy": {"enabled": False},
    },
}

SECRETISH = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|(STORE|DATABASE|DB)_URI$", re.I)
USERNAME = re.compile(r"USER(NAME)?$|username", re.I)


# ------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


_RENDERED: dict[str, dict[str, str]] = {}


def render(chart: helm.Chart, name: str) -> dict[str, str]:
    """template path -> rendered text, for one of VALUE_SETS (rendered once)."""
    if name not in _RENDERED:
        _RENDERED[name] = chart.render(VALUE_SETS[name], name=RELEASE, namespace=NAMESPACE)
    return _RENDERED[name]


def manifests(chart: helm.Chart, name: str) -> list[dict[str, Any]]:
    out = []
    for path, text in render(chart, name).items():
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def notes(chart: helm.Chart, name: str) -> str:
    return render(chart, name)[f"{CHART.name}/templates/NOTES.txt"]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def string_leaves(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from string_leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from string_leaves(v)
    elif isinstance(tree, str):
        yield tree


def secret_data(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def rejection(chart: helm.Chart, values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    return str(err.value)


# ---------------------------------------------------------------- lint + validity
@pytest.mark.parametrize("values_name", ["default", "production"])
def test_helm_lint_is_clean(values_name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[values_name], strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_shipped_and_example_values_pass_the_schema(chart: helm.Chart, values_name: str) -> None:
    chart.validate_schema(VALUE_SETS[values_name])


def test_chart_version_follows_the_project() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == version
    assert DEFAULTS["mlflow"]["image"]["tag"] == ""  # -> appVersion
    for ref in DEFAULTS["pipelineImages"].values():
        assert ref.endswith(f":{version}")


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_every_manifest_validates_against_kubernetes_schemas(chart: helm.Chart, values_name: str) -> None:
    objs = manifests(chart, values_name)
    assert objs
    errors = []
    for version in K8S_VERSIONS:
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"k8s {version} {obj['kind']}/{obj['metadata']['name']}: "
                              f"{'.'.join(map(str, err.path))}: {err.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_object_names_are_unique(chart: helm.Chart, values_name: str) -> None:
    keys = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in manifests(chart, values_name)]
    assert len(keys) == len(set(keys)), sorted(keys)


# ------------------------------------------------------------ what gets deployed
def test_default_install_brings_mlflow_postgresql_and_object_store(chart: helm.Chart) -> None:
    objs = manifests(chart, "default")
    one(objs, "Deployment", "kfp-grpo-mlflow")
    one(objs, "Service", "kfp-grpo-mlflow")
    pg = one(objs, "StatefulSet", "kfp-grpo-postgresql")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    one(objs, "Service", "kfp-grpo-postgresql")
    one(objs, "Deployment", "kfp-grpo-minio")
    one(objs, "PersistentVolumeClaim", "kfp-grpo-minio")
    assert not find(objs, "PersistentVolumeClaim", "kfp-grpo-model-cache")

    server = one(objs, "Deployment", "kfp-grpo-mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    # The backend URI is composed by Kubernetes from the Secret-backed password variable.
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kfp-grpo-postgresql", "key": "password"}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql://$(DB_USER):$(DB_PASSWORD)@kfp-grpo-postgresql:5432/mlflow")
    assert "--artifacts-destination=s3://mlflow/artifacts" in server["args"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://kfp-grpo-minio.kubeflow.svc.cluster.local:9000"


def test_production_values_use_external_database_and_bucket(chart: helm.Chart) -> None:
    objs = manifests(chart, "production")
    assert not find(objs, "StatefulSet") and not [o for o in objs if "minio" in o["metadata"]["name"]]
    deploy = one(objs, "Deployment", "kfp-grpo-mlflow")
    assert deploy["spec"]["replicas"] == 2
    server = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "kfp-grpo-mlflow-db", "key": "uri"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kfp-grpo-mlflow-s3", "key": "secret-key"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kfp-grpo-mlflow-auth"
    assert "--artifacts-destination=s3://ml-platform-mlflow-artifacts/kfp-grpo" in server["args"]
    config = one(objs, "ConfigMap", "kfp-grpo-config")["data"]
    assert config["MLFLOW_S3_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
    assert config["AWS_DEFAULT_REGION"] == "eu-west-1"
    # The user's Secrets are referenced, never rendered.
    rendered_secrets = {s["metadata"]["name"] for s in find(objs, "Secret")}
    assert rendered_secrets == {"kfp-grpo-mlflow-client"}
    pvc = one(objs, "PersistentVolumeClaim", "kfp-grpo-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "efs-sc"


def test_mlflow_server_serves_artifacts_with_auth_and_allowed_hosts(chart: helm.Chart) -> None:
    objs = manifests(chart, "default")
    pod = one(objs, "Deployment", "kfp-grpo-mlflow")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == "ghcr.io/kfp-grpo/mlflow-server:0.1.0"
    assert "--serve-artifacts" in server["args"]
    hosts = next(a for a in server["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in ("kfp-grpo-mlflow", "kfp-grpo-mlflow:*", "kfp-grpo-mlflow.kubeflow.svc.cluster.local:*",
                 "localhost:*"):
        assert host in hosts
    assert "*" not in hosts
    env = {e["name"]: e for e in server["env"]}
    assert env["KFP_GRPO_AUTH_ENABLED"]["value"] == "true"  # the start script adds --app-name basic-auth
    for var, key in (("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
                     ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "kfp-grpo-mlflow-auth", "key": key}
    script = (CHART / "files" / "mlflow-server.sh").read_text()
    assert "--app-name basic-auth" in script and "exec mlflow server" in script
    generated = secret_data(one(objs, "Secret", "kfp-grpo-mlflow-auth"))
    assert len(generated["admin-password"]) >= 12  # MLflow refuses shorter admin passwords


def test_pipeline_configmap_and_secret_match_the_contract(chart: helm.Chart) -> None:
    objs = manifests(chart, "default")
    config = one(objs, "ConfigMap", "kfp-grpo-config")["data"]
    assert config["MLFLOW_TRACKING_URI"] == "http://kfp-grpo-mlflow.kubeflow.svc.cluster.local:5000"
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME"} <= set(config)
    client = secret_data(one(objs, "Secret", "kfp-grpo-mlflow-client"))
    assert set(client) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert client["MLFLOW_TRACKING_USERNAME"] == "kfp-grpo-pipeline"  # not the admin
    # With the bundled store, pipeline pods get the keys the store itself uses.
    store = secret_data(one(objs, "Secret", "kfp-grpo-minio"))
    assert (client["AWS_ACCESS_KEY_ID"], client["AWS_SECRET_ACCESS_KEY"]) == (store["access-key"], store["secret-key"])
    one(objs, "ServiceAccount", "kfp-grpo-pipeline")


def test_names_match_the_pipeline_config_defaults() -> None:
    from components.config import ClusterConfig, TrackingConfig

    cluster = ClusterConfig()
    assert DEFAULTS["pipeline"]["serviceAccountName"] == cluster.service_account
    assert DEFAULTS["pipeline"]["configMapName"] == cluster.config_map
    assert DEFAULTS["pipeline"]["secretName"] == cluster.mlflow_secret
    assert DEFAULTS["pipeline"]["experimentName"] == TrackingConfig().experiment
    assert DEFAULTS["pipelineImages"] == cluster.images.model_dump()


def test_notes_give_the_next_commands_and_a_valid_pipeline_config(chart: helm.Chart) -> None:
    from components.config import parse_config

    text = notes(chart, "default")
    assert "kubectl -n kubeflow port-forward svc/kfp-grpo-mlflow 5000:5000" in text
    assert "kfp-grpo submit   --config my-config.yaml --host http://localhost:8080" in text
    assert 'kfp-grpo schedule --config my-config.yaml --host http://localhost:8080 --cron "0 0 2 * * *"' in text
    assert "get secret kfp-grpo-mlflow-auth" in text
    # The config snippet NOTES prints is a valid pipeline config with the GPU pool settings.
    block = text.split("for this cluster:\n", 1)[1].split("\n\n", 1)[0]
    cfg = parse_config(yaml.safe_load(textwrap.dedent(block)), "NOTES.txt")
    for stage in ("grpo_update", "rollout"):
        placement = cfg.cluster.resources(stage)
        assert placement.node_selector == {"nvidia.com/gpu.present": "true"}
        assert [t.model_dump(exclude_none=True) for t in placement.tolerations] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert placement.accelerator_type == "nvidia.com/gpu"
    assert cfg.cluster.resources("rollout").image == "rollout"


def test_gpu_node_pool_is_documented_once_and_consistently() -> None:
    pool = DEFAULTS["gpuNodePool"]
    assert pool == {
        "accelerator": "nvidia.com/gpu",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    readme = (CHART / "README.md").read_text()
    assert readme.count("## GPU node pools") == 1
    section = readme.split("## GPU node pools", 1)[1].split("\n## ", 1)[0]
    for text in ("gpuNodePool", "nvidia.com/gpu.present", "NoSchedule", "node_selector", "tolerations",
                 "accelerator_type"):
        assert text in section


# ------------------------------------------------------------------- credentials
@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_no_credential_is_rendered_in_plain_text(chart: helm.Chart, values_name: str) -> None:
    objs = manifests(chart, values_name)
    # Every string anyone could have typed into a values file.
    typed = set(string_leaves(DEFAULTS)) | set(string_leaves(PRODUCTION)) | set(string_leaves(VALUE_SETS[values_name]))
    typed.discard("")

    generated: list[str] = []
    for secret in find(objs, "Secret"):
        assert "stringData" not in secret, f"Secret {secret['metadata']['name']} uses stringData"
        for key, value in secret_data(secret).items():
            if USERNAME.search(key):
                continue
            assert value not in typed, f"Secret {secret['metadata']['name']}: {key} is a value from a values file"
            if value:
                assert len(value) >= 20, f"Secret {secret['metadata']['name']}: {key} is short"
                generated.append(value)

    # No credential leaks into any other object (ConfigMaps, env values, args, annotations).
    others = yaml.safe_dump_all([o for o in objs if o["kind"] != "Secret"], width=10_000)
    for value in generated:
        assert value not in others and base64.b64encode(value.encode()).decode() not in others
    # Offline, every `randAlphaNum` call draws a new value, so also look for anything
    # shaped like a generated credential (mixed-case alphanumerics, 20+ characters).
    random_looking = [t for t in re.findall(r"[A-Za-z0-9+/=]{20,}", others)
                      if re.search(r"[a-z]", t) and re.search(r"[A-Z]", t) and re.search(r"[0-9]", t)]
    assert not random_looking, f"credential-like strings outside Secrets: {random_looking}"

    # Credential-like environment variables always come from a Secret.
    for where, spec in pod_specs(objs):
        for c in containers(spec):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and "$(" not in env.get("value", "$("):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}/{c['name']}: {env['name']}"


def test_generated_credentials_are_random_per_install(chart: helm.Chart) -> None:
    # Offline, `lookup` finds nothing, so two installs must not share credentials.
    first = secret_data(one(manifests(chart, "default"), "Secret", "kfp-grpo-postgresql"))
    again = chart.render({}, name=RELEASE, namespace=NAMESPACE)["kfp-grpo/templates/secrets.yaml"]
    second = next(d for d in yaml.safe_load_all(again) if d and d["metadata"]["name"] == "kfp-grpo-postgresql")
    assert secret_data(second)["password"] != first["password"]
    # ... and upgrades keep them: every generated value goes through `lookup` first.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret"' in helpers


def test_credentials_protecting_persistent_data_survive_uninstall(chart: helm.Chart) -> None:
    objs = manifests(chart, "default")
    for name in ("kfp-grpo-mlflow-auth", "kfp-grpo-postgresql", "kfp-grpo-minio"):
        assert one(objs, "Secret", name)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# ---------------------------------------------------------------- pod security
@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_every_pod_is_non_root_unprivileged_and_bounded(chart: helm.Chart, values_name: str) -> None:
    specs = list(pod_specs(manifests(chart, values_name)))
    assert specs
    for where, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: mounts an API token it never uses"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for c in containers(spec):
            sc = c.get("securityContext", {})
            what = f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("privileged", False) is False, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not sc.get("capabilities", {}).get("add"), what
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{what}: {kind} not set"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{what}: {image}"


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_long_running_containers_have_probes(chart: helm.Chart, values_name: str) -> None:
    objs = manifests(chart, values_name)
    for where, spec in pod_specs(objs):
        if where.startswith("Job/"):
            continue
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}/{c['name']}: no {probe}"
    server = one(objs, "Deployment", "kfp-grpo-mlflow")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}


# ----------------------------------------------------------- RBAC and network
@pytest.mark.parametrize("values_name", ["default", "production"])
def test_pipeline_role_is_least_privilege(chart: helm.Chart, values_name: str) -> None:
    objs = manifests(chart, values_name)
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    role = one(objs, "Role", "kfp-grpo-pipeline")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert set(rule["verbs"]) <= {"get", "create", "patch"}, rule
        if set(rule["resources"]) & {"secrets", "configmaps"}:
            assert rule.get("resourceNames"), f"unscoped access to {rule['resources']}"
    binding = one(objs, "RoleBinding", "kfp-grpo-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kfp-grpo-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kfp-grpo-pipeline", "namespace": NAMESPACE}]


def test_trainjob_rights_only_when_asked(chart: helm.Chart) -> None:
    """pipeline.rbac.trainJobs (for grpo.nodes > 1) adds exactly the verbs pipelines.trainer_job uses."""
    rule = {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "delete"]}
    assert rule not in one(manifests(chart, "default"), "Role", "kfp-grpo-pipeline")["rules"]
    values = {**VALUE_SETS["default"], "pipeline": {**VALUE_SETS["default"].get("pipeline", {}),
                                                     "rbac": {"trainJobs": True}}}
    objs = [d for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE).items()
            if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    assert rule in one(objs, "Role", "kfp-grpo-pipeline")["rules"]
    from pipelines import trainer_job

    used = set(re.findall(r"\b(create|get|delete|list|watch|patch)_namespaced_custom_object",
                          Path(trainer_job.__file__).read_text()))
    assert used <= set(rule["verbs"]), used


def test_network_policies_restrict_who_reaches_mlflow_and_the_stores(chart: helm.Chart) -> None:
    objs = manifests(chart, "default")
    policy = one(objs, "NetworkPolicy", "kfp-grpo-mlflow")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}} in peers
    assert all(p.get("podSelector", {}).get("matchLabels") for p in peers), "a peer that admits every pod"
    database = one(objs, "NetworkPolicy", "kfp-grpo-postgresql")["spec"]["ingress"]
    assert database == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "mlflow", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/name": "kfp-grpo"}}}], "ports": [{"protocol": "TCP", "port": 5432}]}]
    one(objs, "NetworkPolicy", "kfp-grpo-minio")

    prod_peers = one(manifests(chart, "production"), "NetworkPolicy", "kfp-grpo-mlflow")["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow-user-ml-platform"}},
            "podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}} in prod_peers


def test_setup_job_is_an_idempotent_hook(chart: helm.Chart) -> None:
    job = one(manifests(chart, "default"), "Job", "kfp-grpo-setup")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KFP_GRPO_PIPELINE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kfp-grpo-mlflow-client", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert env["KFP_GRPO_BUCKET"]["value"] == "mlflow"
    compile((CHART / "files" / "setup.py").read_text(), "setup.py", "exec")


# ------------------------------------------------------------------ the schema
BAD_VALUES = [
    ({"mlflow": {"replicas": -1}}, "/mlflow/replicas"),
    ({"mlflow": {"workers": 0}}, "/mlflow/workers"),
    ({"mlflow": {"auth": {"defaultPermission": "ALL"}}}, "/mlflow/auth/defaultPermission"),
    ({"mlflow": {"service": {"type": "Ingress"}}}, "/mlflow/service/type"),
    ({"mlflow": {"auth": {"adminPassword": "hunter2hunter2"}}}, "adminPassword"),  # no plaintext credentials
    ({"postgresql": {"enabled": False}}, "/externalDatabase/existingSecret"),  # required without the bundled DB
    ({"minio": {"enabled": False}}, "/externalS3/endpoint"),  # required without the bundled store
    ({"externalS3": {"endpoint": "s3.amazonaws.com"}}, "/externalS3/endpoint"),
    ({"postgresql": {"image": {"tag": "latest"}}}, "/postgresql/image/tag"),
    ({"pipelineImages": {"cpu": "ghcr.io/kfp-grpo/trainer-cpu:latest"}}, "/pipelineImages/cpu"),
    ({"mlflow": {"resources": {"limits": None}}}, "limits"),
    ({"mlflow": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}}, "/mlflow/resources/requests/cpu"),
    ({"mlflow": {"runAsUser": 0}}, "/mlflow/runAsUser"),
    ({"pipeline": {"secretName": "Not_A_Name"}}, "/pipeline/secretName"),
    ({"pipeline": {"extraConfig": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "AWS_SECRET_ACCESS_KEY"),
    ({"mlflow": {"extraEnv": [{"name": "DB_PASSWORD", "value": "x"}]}}, "/mlflow/extraEnv/0/value"),
    ({"gpuNodePool": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}},
     "/gpuNodePool/tolerations/0/operator"),
    ({"artifactStore": {"bucket": "Bad_Bucket"}}, "/artifactStore/bucket"),
    ({"mlfow": {"replicas": 1}}, "mlfow"),  # typo of a top-level key
]


@pytest.mark.parametrize("values,field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_field(chart: helm.Chart, values: dict, field: str) -> None:
    assert field in rejection(chart, values)


def test_install_refuses_values_the_schema_rejects(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="/mlflow/replicas"):
        chart.render({"mlflow": {"replicas": -1}}, name=RELEASE, namespace=NAMESPACE)
