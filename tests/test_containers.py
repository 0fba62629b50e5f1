"""The images, built for real, and the pipeline run in them (`kfp-grpo run --runner docker`).

Once per session: a container engine (a running Docker or podman API; else, as root on a
Debian machine, docker/setup-podman.sh installs podman and serves its Docker API), the base
image (pulled, else made by docker/make-base-image.sh), then trainer-cpu and the MLflow image
built by docker/Makefile with the build options this machine's pip uses (its CA bundle and
local wheel directory). Layer caching makes later sessions quick. Then real kfp.local runs
in real containers: the reduced pipeline end to end, a task that exits non-zero, and a
pipeline task that fails. Where no engine answers and none can be installed, the tests that
need one skip, saying why.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import tracking
from pipelines import cli, containers

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
REGISTRY = "localhost/kfp-grpo-test"
VERSION = re.search(r'^version *= *"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
BASE = re.search(r"^FROM (\S+)", (DOCKER / "trainer-cpu.Dockerfile").read_text(), re.M).group(1)
MAX_TRAINER_CPU_BYTES = 1.4e9
# the reduced pipeline: 10 tasks (SFT, RM, 1 iteration × 1 round, replay, 2 evals, promote)
REDUCED = ["sft.steps=20", "reward_model.steps=5", "replay.steps=5", "loop.iterations=1",
           "loop.steps_per_iteration=1", "data.num_train=200", "data.num_test=40", "rollout.prompts_per_step=8"]


def _sets(items: list[str]) -> list[str]:
    return sum([["--set", s] for s in items], [])


def _engine() -> str:
    """The Docker API URL; installs and serves podman where none answers (root + apt)."""
    try:
        return containers.find_docker_host()
    except containers.ContainerError as err:
        if os.geteuid() != 0:
            pytest.skip(f"{err}; docker/setup-podman.sh cannot install podman here: not root")
        if not shutil.which("apt-get"):
            pytest.skip(f"{err}; docker/setup-podman.sh cannot install podman here: no apt-get")
    out = subprocess.run(["bash", str(DOCKER / "setup-podman.sh"), "--service"], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"^export DOCKER_HOST=(\S+)$", out.stdout, re.M).group(1)


def _host_pip_options() -> list[str]:
    """docker/Makefile build options from this machine's pip configuration (CA bundle, local wheels)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    options = []
    if values.get("cert") and Path(values["cert"]).is_file():
        options.append(f"CA_BUNDLE={values['cert']}")
    wheels = next((d for d in values.get("find-links", "").split() if Path(d).is_dir()), None)
    if wheels:
        options.append(f"WHEELS={wheels}")
        if any(Path(wheels).glob("torch-*+cpu-*.whl")):
            options.append("TORCH_INDEX_URL=")  # the CPU torch is here: no PyTorch index needed
    return options


@pytest.fixture(scope="module")
def engine() -> dict:
    """The engine's URL, a client, and the CLI that builds for it (podman or docker)."""
    import docker

    url = _engine()
    client = docker.DockerClient(base_url=url)
    components = client.version().get("Components") or []
    build_cli = "podman" if any("podman" in (c.get("Name") or "").lower() for c in components) else "docker"
    if not shutil.which(build_cli):
        pytest.skip(f"the engine at {url} is {build_cli}'s, but there is no `{build_cli}` command to build with")
    yield {"url": url, "client": client, "cli": build_cli}
    client.close()


@pytest.fixture(scope="module")
def images(engine, tmp_path_factory) -> dict:
    """trainer-cpu and the MLflow image, built from this checkout (once per session)."""
    import docker

    client, env = engine["client"], {**os.environ, "DOCKER": engine["cli"]}
    log = tmp_path_factory.mktemp("build") / "build.log"
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(BASE)
        except docker.errors.APIError:  # no registry: the stand-in from Debian
            out = subprocess.run(["bash", str(DOCKER / "make-base-image.sh"), BASE], env=env, capture_output=True,
                                 text=True, timeout=1800)
            assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    start = time.monotonic()
    with log.open("w") as f:
        code = subprocess.run(["make", "-C", str(DOCKER), "build-trainer-cpu", "build-mlflow-server",
                               f"DOCKER={engine['cli']}", f"REGISTRY={REGISTRY}", f"VERSION={VERSION}",
                               *_host_pip_options()], stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
    assert code == 0, log.read_text()[-5000:]
    print(f"\nimages built in {time.monotonic() - start:.0f} s ({engine['cli']})", file=sys.stderr)
    return {"cpu": f"{REGISTRY}/trainer-cpu:{VERSION}", "mlflow": f"{REGISTRY}/mlflow-server:{VERSION}"}


# ------------------------------------------------------------------ the images
def test_images_are_slim_and_run_as_the_project_user(engine, images) -> None:
    client = engine["client"]
    size = client.images.get(images["cpu"]).attrs["Size"]
    assert size <= MAX_TRAINER_CPU_BYTES, f"trainer-cpu is {size / 1e9:.2f} GB"
    # the entrypoint is the stage CLI, as the non-root project user
    usage = client.containers.run(images["cpu"], ["sft", "--help"], remove=True).decode()
    assert "usage: kfp-grpo stage sft" in usage
    assert client.containers.run(images["cpu"], ["-u"], entrypoint=["id"], remove=True).decode().strip() == "10001"
    # tasks get MLflow's client only; the server image has the server
    probe = "import importlib.util as u; print(u.find_spec('flask') is None, u.find_spec('mlflow') is not None)"
    assert client.containers.run(images["cpu"], ["-c", probe], entrypoint=["python"], remove=True).split() == [
        b"True", b"True"]
    version = client.containers.run(images["mlflow"], ["mlflow", "--version"], remove=True).decode()
    assert "3.17.2" in version


# ------------------------------------------------------------------ kfp.local in containers
def test_a_task_that_exits_non_zero_fails_the_run(engine, images, tmp_path) -> None:
    """kfp.local ran the command as CMD (the image's ENTRYPOINT swallowed it) and reported
    SUCCESS for a container gone before its exit code was read; both fixed for our runs."""
    from kfp import dsl, local

    @dsl.component(base_image=images["cpu"], install_kfp_package=False)
    def exits(code: int) -> int:
        import sys

        if code:
            sys.exit(code)
        return 7

    @dsl.pipeline(name="exit-code")
    def pipeline(code: int) -> int:
        return exits(code=code).output

    local.init(runner=containers.docker_runner(), pipeline_root=str(tmp_path), raise_on_error=True)
    with containers.docker_host(engine["url"]), containers.kfp_runs_containers_safely():
        assert pipeline(code=0).output == 7  # the component's command ran despite ENTRYPOINT kfp-grpo stage
        with pytest.raises(RuntimeError, match="FAILURE"):
            pipeline(code=3)


def test_reduced_pipeline_runs_in_containers_and_registers_a_loadable_policy(engine, images, tmp_path, capfd,
                                                                               monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DOCKER_HOST", engine["url"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "w"
    start = time.monotonic()
    code = cli.main(["run", "--runner", "docker", "--workdir", str(workdir), "--output", "json", "--mlflow-image",
                     images["mlflow"], *_sets([f"cluster.images.cpu={images['cpu']}", *REDUCED])])
    seconds = time.monotonic() - start
    out = capfd.readouterr().out
    assert code == 0, out[-5000:]
    summary = json.loads(out[out.rindex("\n{\n") + 1:])
    with capfd.disabled():
        print(f"\nreduced pipeline in containers: {seconds:.0f} s; {summary['text'].strip()}")
    # every task ran in its container (each task's log names it)
    logs = sorted(Path(summary["logs"]).glob("*.log"))
    ran = [re.findall(r"kfp-grpo: task container \w+ from (\S+)", log.read_text()) for log in logs
           if log.name != "run.log"]
    assert ran == [[images["cpu"]]] * 10, dict(zip([log.name for log in logs], ran))
    assert summary["tracking_uri"] == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    # The server kept its store in the workdir: served again from the MLflow image, the registered
    # policy downloads to a directory plain transformers loads. (It is also the champion only if
    # GRPO beat the start, which 20 SFT steps and one round do not promise.)
    assert (workdir / "mlflow-server.log").exists()
    with containers.mlflow_server(engine["client"], images["mlflow"], workdir) as uri:
        client = tracking.client(uri)  # also the process default, for download_model
        registered = client.get_model_version_by_alias("kfp-grpo-policy", "challenger")
        assert str(registered.version) == summary["policy_version"]
        if summary["promoted"]:
            assert client.get_model_version_by_alias("kfp-grpo-policy", "champion").version == registered.version
        path = tracking.download_model(f"models:/kfp-grpo-policy/{registered.version}", str(tmp_path / "policy"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_a_failing_pipeline_task_fails_the_run(engine, images, tmp_path, capfd, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("DOCKER_HOST", engine["url"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "w"
    code = cli.main(["run", "--runner", "docker", "--workdir", str(workdir), "--mlflow-image", images["mlflow"],
                     *_sets([f"cluster.images.cpu={images['cpu']}", "data.source=file",
                             "data.path=/nonexistent/train.jsonl", "cluster.stages.prepare_data.retries=0",
                             *REDUCED])])
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "Inner task failed: 'prepare-data'" in err[0], err
    parent = re.search(r"--resume ([0-9a-f]+)$", err[0]).group(1)
    assert mlflow.MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}").get_run(parent).info.status == "FAILED"


# ------------------------------------------------------------------ clear errors (no engine needed)
def test_no_container_engine_is_one_clear_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/none.sock")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["run", "--runner", "docker", "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no container engine found") and "\n" not in err, err
    assert "podman system service" in err


def test_a_local_store_cannot_serve_containers(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["run", "--runner", "docker", "--workdir", str(tmp_path), "--set",
                     f"tracking.tracking_uri={uri}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: tasks in containers cannot reach the MLflow store {uri}: name an http(s) MLflow "
                   "server, or none (then one is started from the MLflow image)"), err
