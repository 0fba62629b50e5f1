"""`kfp-grpo run --runner docker`: every task in the image its placement names.

The pipeline is the one `kfp-grpo run` runs, through kfp.local's DockerRunner against
Docker or podman's Docker-compatible API. Unless the config or $MLFLOW_TRACKING_URI names
an http(s) MLflow server, the tasks report to an MLflow server started from the project's
MLflow image on 127.0.0.1 for the run; its store stays in the workdir (`mlflow.db`,
`mlartifacts/`). Tasks share the host's network and run as the invoking user (plus group
0, which owns the images' home directories), so the outputs in the workdir are the user's.

kfp.local (2.14-2.17) runs containers in two ways that break here, fixed for the run:
- the command it passes is the container's CMD, so an image ENTRYPOINT (ours:
  `kfp-grpo stage`) swallowed it; as on Kubernetes, the command replaces the entrypoint;
- it auto-removes the container and reports SUCCESS when the container is gone before its
  exit code is read (podman removes it quickly), so a failed task passed; here the exit
  code is read first and the container removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from components.config import STAGES, Config
from pipelines.local import PipelineFailed, format_summary, run_local

# Where Docker and podman serve their API when $DOCKER_HOST is not set (first answering wins).
SOCKETS = ("/var/run/docker.sock", "/run/podman/podman.sock")
ENGINE_HELP = ("start Docker, or podman's Docker API (`podman system service --time=0 "
               "unix:///run/podman/podman.sock &`, see docker/setup-podman.sh), or set DOCKER_HOST")
SERVER_START_TIMEOUT_S = 180


class ContainerError(PipelineFailed):
    """The container engine, an image or the MLflow server container is missing or failed."""


def default_mlflow_image() -> str:
    """The project's MLflow server image as docker/Makefile tags it: ghcr.io/kfp-grpo/mlflow-server:<version>."""
    try:
        version = importlib.metadata.version("kfp-grpo")
    except importlib.metadata.PackageNotFoundError:
        version = "0.1.0"
    return f"ghcr.io/kfp-grpo/mlflow-server:{version}"


def find_docker_host() -> str:
    """$DOCKER_HOST, else the first of SOCKETS (and podman's rootless socket) that answers a ping."""
    import docker

    if os.environ.get("DOCKER_HOST"):
        candidates = [os.environ["DOCKER_HOST"]]
    else:
        rootless = Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")) / "podman" / "podman.sock"
        candidates = [f"unix://{s}" for s in (*SOCKETS, str(rootless)) if Path(s).exists()]
    for url in candidates:
        try:
            with contextlib.closing(docker.DockerClient(base_url=url, timeout=10)) as client:
                client.ping()
            return url
        except Exception:  # noqa: BLE001 — try the next one; none answering is the error below
            continue
    tried = ", ".join(candidates) or "no Docker or podman socket exists"
    raise ContainerError(f"no container engine found ({tried}): {ENGINE_HELP}")


def pipeline_images(cfg: Config) -> list[str]:
    """The images the pipeline's tasks run in (cluster.images, per the stages' placement)."""
    return sorted({getattr(cfg.cluster.images, cfg.cluster.resources(stage).image) for stage in STAGES})


def ensure_images(client: Any, images: list[str]) -> None:
    """Every image present locally, else pulled; one clear error naming the missing one."""
    import docker

    for image in images:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            try:
                client.images.pull(image)
            except docker.errors.APIError as err:
                reason = " ".join(str(getattr(err, "explanation", None) or err).split())[:200]
                raise ContainerError(
                    f"image {image} is not here and cannot be pulled ({reason}): build it (make -C docker "
                    f"build, see docker/README.md) or name another with --set cluster.images.<cpu|gpu|rollout>=... "
                    f"(--mlflow-image for the MLflow server)") from None


def run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                  **run_args: Any) -> int:
    """Run one kfp.local task container; return its exit code.

    Replaces `kfp.local.docker_task_handler.run_docker_container` (same signature): the
    command replaces the image's entrypoint, and the exit code is read before the
    container is removed.
    """
    container = client.containers.run(image=image, entrypoint=command[:1], command=command[1:],
                                       volumes=volumes, detach=True, **run_args)
    print(f"kfp-grpo: task container {container.short_id} from {image}", flush=True)
    try:
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


@contextlib.contextmanager
def kfp_runs_containers_safely() -> Iterator[None]:
    """Use run_container for kfp.local's Docker tasks while the block runs."""
    from kfp.local import docker_task_handler

    original = getattr(docker_task_handler, "run_docker_container", None)
    if original is None:
        raise ContainerError("this kfp version runs local containers differently: kfp-grpo's Docker runner "
                             "supports kfp 2.14-2.17")
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


@contextlib.contextmanager
def docker_host(url: str) -> Iterator[None]:
    """$DOCKER_HOST=url while the block runs (kfp.local connects with docker.from_env())."""
    before = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = before


def _user() -> dict[str, Any]:
    """Run as the invoking user, with group 0 (the images' home directories are group-0 writable)."""
    return {"user": f"{os.getuid()}:{os.getgid()}", "group_add": ["0"]}


def _mount_mode(client: Any) -> str:
    return "rw,z" if "name=selinux" in client.info().get("SecurityOptions", []) else "rw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_uri(workdir: Path) -> tuple[str, str]:
    """The MLflow server's backend store and artifact root in `workdir`."""
    root = workdir.resolve()
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts")


@contextlib.contextmanager
def mlflow_server(client: Any, image: str, workdir: Path) -> Iterator[str]:
    """Serve `workdir`'s MLflow store from `image` on 127.0.0.1 while the block runs; yields its URI.

    The server's log is kept in `<workdir>/mlflow-server.log`.
    """
    backend, artifacts = store_uri(workdir)
    root = str(workdir.resolve())
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    command = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend, "--artifacts-destination", artifacts]
    container = client.containers.run(image, command=command, detach=True, network_mode="host",
                                      volumes={root: {"bind": root, "mode": _mount_mode(client)}},
                                      name=f"kfp-grpo-mlflow-{port}", **_user())
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(uri):
            container.reload()
            if container.status not in ("created", "running") or time.monotonic() > deadline:
                log = " ".join(container.logs(tail=5).decode(errors="replace").split())[-400:]
                raise ContainerError(f"the MLflow server ({image}) did not come up at {uri} "
                                     f"(container {container.status}): {log}")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(Exception):
            (workdir / "mlflow-server.log").write_bytes(container.logs())
        container.remove(force=True)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def docker_runner() -> Any:
    """kfp.local's DockerRunner with the host's network, as the invoking user."""
    from kfp import local

    return local.DockerRunner(network_mode="host", **_user())


def run_in_containers(cfg: Config, workdir: Path, init: dict[str, str], resume_run_id: str = "",
                      verbose: bool = False, mlflow_image: str = "") -> dict:
    """`run_local` with every task in its container (and an MLflow server container); returns the summary."""
    import docker

    configured = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if configured and not configured.startswith(("http://", "https://")):
        raise ContainerError(f"tasks in containers cannot reach the MLflow store {configured}: name an http(s) "
                             "MLflow server, or none (then one is started from the MLflow image)")
    url = find_docker_host()
    client = docker.DockerClient(base_url=url)
    mlflow_image = mlflow_image or default_mlflow_image()
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(client), docker_host(url), kfp_runs_containers_safely():
        ensure_images(client, pipeline_images(cfg) + ([] if configured else [mlflow_image]))
        if configured:
            return run_local(cfg, workdir, init, resume_run_id, verbose, runner=docker_runner())
        with mlflow_server(client, mlflow_image, workdir) as uri:
            served = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})
            summary = run_local(served, workdir, init, resume_run_id, verbose, runner=docker_runner())
    backend, artifacts = store_uri(workdir)
    summary.update(tracking_uri=backend, mlflow_server=uri,
                   browse=f"mlflow ui --backend-store-uri {backend} --artifacts-destination {artifacts}")
    summary["text"] = format_summary(summary, cfg)
    return summary
