"""The images (docker/), checked without a Docker engine.

Each Dockerfile is parsed (continuations joined, comments dropped, ARG defaults
substituted) and checked against the repository: what it copies exists and is not
ignored, the base images are pinned, the user is non-root, the entrypoint is the
project's console script, what it pip-installs agrees with pyproject.toml, and the
Makefile builds the image names the pipeline config and the Helm chart default to.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
VERSION = PROJECT["version"]

# image name -> Dockerfile
PROJECT_IMAGES = {
    "trainer-cpu": "trainer-cpu.Dockerfile",
    "trainer-cuda": "trainer-cuda.Dockerfile",
    "rollout-vllm": "rollout-vllm.Dockerfile",
}
ALL_IMAGES = {**PROJECT_IMAGES, "mlflow-server": "mlflow.Dockerfile"}
# The pipeline config's cluster.images defaults (the contract with pipelines/).
CONTRACT = {
    "cpu": "ghcr.io/kfp-grpo/trainer-cpu:0.1.0",
    "gpu": "ghcr.io/kfp-grpo/trainer-cuda:0.1.0",
    "rollout": "ghcr.io/kfp-grpo/rollout-vllm:0.1.0",
}


# ------------------------------------------------------------------------ parsing
class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.instructions: list[tuple[str, str]] = []
        buf = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#") or (not buf and not line):
                continue  # comments (also inside continuations) and blank lines
            if line.endswith("\\"):
                buf += line[:-1].strip() + " "
                continue
            buf += line
            keyword, _, rest = buf.partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))
            buf = ""
        assert not buf, f"{path.name}: dangling line continuation"
        self.args: dict[str, str] = {}
        for keyword, rest in self.instructions:
            if keyword == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                self.args[name.strip()] = default.strip().strip('"')

    def expand(self, text: str) -> str:
        """Substitute ${ARG} / $ARG with the ARG defaults."""
        def sub(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            return self.args.get(name, match.group(0))
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)

    def all(self, keyword: str) -> list[str]:
        return [self.expand(rest) for kw, rest in self.instructions if kw == keyword]

    def index(self, keyword: str, contains: str = "") -> int:
        for i, (kw, rest) in enumerate(self.instructions):
            if kw == keyword and contains in self.expand(rest):
                return i
        raise AssertionError(f"{self.path.name}: no {keyword} containing {contains!r}")

    def labels(self) -> dict[str, str]:
        out = {}
        for rest in self.all("LABEL"):
            for key, value in re.findall(r'([\w.\-/]+)=("[^"]*"|\S+)', rest):
                out[key] = value.strip('"')
        return out

    def pip_installs(self) -> list[str]:
        """The arguments of every `pip install` in RUN instructions."""
        out = []
        for rest in self.all("RUN"):
            for command in re.split(r"&&|;", rest):
                words = command.split()
                if "pip" in words and "install" in words[words.index("pip"):]:
                    out.append(" ".join(words[words.index("install") + 1:]))
        return out


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile(DOCKER / name)


def copy_sources(df: Dockerfile) -> list[str]:
    sources = []
    for rest in df.all("COPY"):
        if rest.startswith("["):
            parts = json.loads(rest)
        else:
            parts = [p for p in rest.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in rest.split()):
                continue  # from another stage or image, not the build context
        sources.extend(parts[:-1])
    return sources


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            result = not negate
    return result


# ------------------------------------------------------------- every Dockerfile
@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_base_images_are_pinned(name: str) -> None:
    froms = dockerfile(name).all("FROM")
    assert froms
    for line in froms:
        image = line.split()[0]
        assert "$" not in image, f"{name}: FROM {image} depends on an unset ARG"
        repo_and_tag = image.split("@", 1)[0]
        last = repo_and_tag.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"{name}: FROM {image} has no tag or digest"
        tag = last.split(":", 1)[1] if ":" in last else ""
        assert tag != "latest", f"{name}: FROM {image} uses latest"


@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_copied_files_exist_and_are_not_dockerignored(name: str) -> None:
    df = dockerfile(name)
    assert not df.all("ADD"), f"{name}: use COPY, not ADD"
    ignore_file = DOCKER / f"{name}.dockerignore"
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore_file.exists() else []
    for source in copy_sources(df):
        assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the repository"
        assert not ignored(patterns, source.rstrip("/")), f"{name}: COPY {source} is excluded by {ignore_file.name}"


@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    df = dockerfile(name)
    users = df.all("USER")
    assert users, f"{name}: no USER (would run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) > 0, f"{name}: USER {users[-1]} (numeric and non-zero, so runAsNonRoot can verify it)"
    # Nothing after the last USER switches back to root or installs software.
    last_user = max(i for i, (kw, _) in enumerate(df.instructions) if kw == "USER")
    after = df.instructions[last_user + 1:]
    assert not [rest for kw, rest in after if kw == "RUN"], f"{name}: RUN after the final USER"


@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_version_label_matches_pyproject(name: str) -> None:
    labels = dockerfile(name).labels()
    assert labels.get("org.opencontainers.image.version") == VERSION, labels


@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_layers_stay_small(name: str) -> None:
    df = dockerfile(name)
    env = " ".join(df.all("ENV"))
    for args in df.pip_installs():
        assert "PIP_NO_CACHE_DIR=1" in env or "--no-cache-dir" in args, f"{name}: pip keeps its cache"
    for rest in df.all("RUN"):
        if "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest, rest


# ------------------------------------------------------------- project images
@pytest.mark.parametrize("name", sorted(PROJECT_IMAGES.values()))
def test_entrypoint_is_kfp_grpo_stage(name: str) -> None:
    (entrypoint,) = dockerfile(name).all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kfp-grpo", "stage"]
    assert PROJECT["scripts"]["kfp-grpo"] == "pipelines.cli:main"


def test_entrypoint_resolves_to_the_cli() -> None:
    module, _, func = PROJECT["scripts"]["kfp-grpo"].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.exists(), f"the console script's module {source.relative_to(ROOT)} is missing"
    # What `docker run IMAGE sft --help` runs.
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    result = subprocess.run([sys.executable, "-c", code, "stage", "sft", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(PROJECT_IMAGES.values()))
def test_project_is_installed_dependencies_before_source(name: str) -> None:
    df = dockerfile(name)
    deps_copy = df.index("COPY", "pyproject.toml")
    deps_install = df.index("RUN", "pip uninstall -y kfp-grpo")  # deps from pyproject + stubs
    source_copies = [df.index("COPY", "components"), df.index("COPY", "pipelines")]
    source_install = df.index("RUN", "--no-deps")
    assert deps_copy < deps_install < min(source_copies) <= max(source_copies) < source_install
    # The project (with kfp, a dependency) is installed: KFP runs components with
    # install_kfp_package=False, so the image must bring kfp itself.
    assert any(Requirement(r).name == "kfp" for r in PROJECT["dependencies"])
    # pyproject's own COPY set is everything the package build needs.
    assert {"pyproject.toml", "README.md", "components", "pipelines"} <= {
        s.rstrip("/") for s in copy_sources(df) if "/" not in s.rstrip("/")}


@pytest.mark.parametrize("name", sorted(PROJECT_IMAGES.values()))
def test_installed_extras_and_pins_agree_with_pyproject(name: str) -> None:
    df = dockerfile(name)
    extras_defined = PYPROJECT["project"]["optional-dependencies"]
    specs = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    for extra in extras_defined.values():
        for r in extra:
            specs.setdefault(Requirement(r).name, Requirement(r))
    for args in df.pip_installs():
        for extras in re.findall(r"\.\[([\w,\-]+)\]", args):
            for extra in extras.split(","):
                assert extra in extras_defined, f"{name}: extra [{extra}] is not in pyproject.toml"
        for pinned in re.findall(r'"?([A-Za-z0-9_.\-]+)==([0-9][\w.+]*)"?', args):
            package, version = pinned
            if package in specs:
                assert specs[package].specifier.contains(Version(version), prereleases=True), (
                    f"{name}: {package}=={version} does not satisfy pyproject's {specs[package]}")


def test_cpu_image_installs_cpu_torch_wheels() -> None:
    df = dockerfile("trainer-cpu.Dockerfile")
    torch = next(a for a in df.pip_installs() if "torch==" in a)
    # The CPU index is an extra index: its 2.13.0+cpu sorts above PyPI's (CUDA) 2.13.0.
    assert df.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch.replace('"', "")
    assert "torch==2.13.0" in torch.replace('"', "")
    # ... and the build fails if a CUDA build got in after all.
    assert "torch.version.cuda" in next(r for r in df.all("RUN") if "torch==" in r)
    # torch comes first, so the project install finds it satisfied and keeps the CPU build.
    assert df.index("RUN", "torch==") < df.index("RUN", "pip uninstall -y kfp-grpo")


@pytest.mark.parametrize("name", ["trainer-cuda.Dockerfile", "rollout-vllm.Dockerfile"])
def test_cuda_images_refuse_a_cpu_torch(name: str) -> None:
    run = next(r for r in dockerfile(name).all("RUN") if "torch==" in r)
    assert "torch.version.cuda" in run and "CPU-only" in run


def test_rollout_image_brings_vllm_with_the_trainers_torch() -> None:
    rollout = dockerfile("rollout-vllm.Dockerfile")
    installs = " ".join(rollout.pip_installs())
    assert ".[gpu]" in installs and re.search(r"vllm==\d", installs)
    torch_versions = {re.search(r"torch==([\w.]+)", " ".join(dockerfile(n).pip_installs())).group(1)
                      for n in PROJECT_IMAGES.values()}
    assert torch_versions == {"2.13.0"}


def test_rollout_image_vllm_pins_fit_the_project() -> None:
    """vLLM's narrower pins (VLLM_PINS) replace constraints.txt's for those packages only."""
    rollout = dockerfile("rollout-vllm.Dockerfile")
    constraints = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#")}
    specs = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    for pin in rollout.args["VLLM_PINS"].split():
        package, _, version = pin.partition("==")
        assert package.lower() in constraints, f"VLLM_PINS: {package} is not pinned by constraints.txt"
        if package in specs:
            assert specs[package].specifier.contains(Version(version)), f"{pin} vs pyproject's {specs[package]}"


def test_mlflow_image_has_what_the_chart_needs() -> None:
    df = dockerfile("mlflow.Dockerfile")
    installs = " ".join(df.pip_installs())
    mlflow_version = df.args["MLFLOW_VERSION"]
    # The same base as the project images: one locally made stand-in serves every build.
    assert df.all("FROM") == dockerfile("trainer-cpu.Dockerfile").all("FROM")
    assert f"mlflow[auth]=={mlflow_version}" in installs  # --app-name basic-auth needs Flask-WTF
    assert f"mlflow=={mlflow_version}" in (ROOT / "constraints.txt").read_text().splitlines()
    assert "psycopg2-binary==" in installs and "boto3==" in installs
    assert df.all("CMD") and "mlflow" in df.all("CMD")[0]
    chart = yaml.safe_load((ROOT / "helm" / "kfp-grpo" / "Chart.yaml").read_text())
    assert chart["annotations"]["kfp-grpo/mlflow-version"] == mlflow_version


# ----------------------------------------------------- builds anywhere, offline
@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_no_frontend_pull(name: str) -> None:
    """A `# syntax=` line makes BuildKit pull its Dockerfile frontend from a registry."""
    first = (DOCKER / name).read_text().lstrip().splitlines()[0]
    assert not first.replace(" ", "").lower().startswith("#syntax="), f"{name}: {first}"


@pytest.mark.parametrize("name", sorted(ALL_IMAGES.values()))
def test_pip_installs_use_the_constraints_and_the_build_options(name: str) -> None:
    df = dockerfile(name)
    mount = "--mount=type=bind,source=docker/build-extras,target=/tmp/build-extras"
    assert df.args["PIP_CONFIG_FILE"] == "/tmp/build-extras/pip.conf"
    for rest in df.all("RUN"):
        if "pip install" not in rest:
            continue
        assert rest.startswith(mount), f"{name}: a pip step without the build options: {rest[:80]}"
        for command in re.split(r"&&|;", rest):
            if "pip install" in command and "--no-deps" not in command:
                assert re.search(r"-c \S*constraints\.txt", command), f"{name}: unconstrained: {command.strip()[:80]}"
    patterns = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert "!docker/build-extras/" in patterns and "!constraints.txt" in patterns
    assert (ROOT / "docker" / "build-extras" / "README.md").exists()


@pytest.mark.parametrize("script", ["setup-podman.sh", "make-base-image.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------- Makefile
@pytest.fixture(scope="module")
def make() -> str:
    exe = shutil.which("make")
    if exe is None:
        pytest.skip("make is not installed")
    return exe


def run_make(make: str, *args: str) -> str:
    result = subprocess.run([make, "-s", "-C", str(DOCKER), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_makefile_tags_are_the_pipeline_config_defaults(make: str) -> None:
    tags = dict(line.split("=", 1) for line in run_make(make, "images").split())
    assert tags == {
        "trainer-cpu": CONTRACT["cpu"],
        "trainer-cuda": CONTRACT["gpu"],
        "rollout-vllm": CONTRACT["rollout"],
        "mlflow-server": f"ghcr.io/kfp-grpo/mlflow-server:{VERSION}",
    }
    values = yaml.safe_load((ROOT / "helm" / "kfp-grpo" / "values.yaml").read_text())
    assert values["pipelineImages"] == CONTRACT
    assert f"{values['mlflow']['image']['repository']}:{VERSION}" == tags["mlflow-server"]


def test_makefile_builds_and_pushes_every_image(make: str) -> None:
    build = run_make(make, "-n", "build", "REGISTRY=registry.example.com/ml")
    push = run_make(make, "-n", "push", "REGISTRY=registry.example.com/ml")
    for image, file in ALL_IMAGES.items():
        line = next(line for line in build.splitlines() if f"-t registry.example.com/ml/{image}:{VERSION}" in line)
        assert f"-f {DOCKER / file}" in line and f"--build-arg VERSION={VERSION}" in line
        assert line.rstrip().endswith(str(ROOT)), "the build context must be the repository root"
        assert f"docker push registry.example.com/ml/{image}:{VERSION}" in push


def test_makefile_passes_the_ignore_file_to_podman(make: str) -> None:
    for engine in ("podman", "/usr/bin/buildah"):
        build = run_make(make, "-n", "build-trainer-cpu", f"DOCKER={engine}")
        assert f"--ignorefile {DOCKER / 'trainer-cpu.Dockerfile.dockerignore'}" in build
    assert "--ignorefile" not in run_make(make, "-n", "build-trainer-cpu")  # Docker reads it itself


def test_makefile_build_options(make: str) -> None:
    build = run_make(make, "-n", "build-trainer-cpu", "CA_BUNDLE=/x/ca.crt", "WHEELS=/x/wheels", "TORCH_INDEX_URL=")
    assert "cert = /tmp/build-extras/ca.pem" in build and "find-links = /tmp/build-extras/wheels" in build
    assert "--build-arg TORCH_INDEX_URL= " in build  # set empty: no extra torch index
    assert "TORCH_INDEX_URL" not in run_make(make, "-n", "build-trainer-cpu")  # unset: the Dockerfile's default
