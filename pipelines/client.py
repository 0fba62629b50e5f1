"""Talk to a Kubeflow Pipelines endpoint: submit one run, or schedule recurring runs."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

from components.config import Config
from components.tracking import champion_uris
from components.redaction import refuse_credentials


POLL_S = 10  # `submit --wait`: seconds between two looks at the run's state


def _client(host: str | None, token: str | None, namespace: str | None):
    import kfp

    credentials = None
    if not token and os.environ.get("KF_PIPELINES_SA_TOKEN_PATH"):
        # kfp.Client reads this projected service-account token only when it has no host at all
        # (in-cluster DNS); honour it as well with --host / $KF_PIPELINES_ENDPOINT.
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        credentials = ServiceAccountTokenVolumeCredentials(os.environ["KF_PIPELINES_SA_TOKEN_PATH"])
    with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow",
                          credentials=credentials)


def _pipeline_id(c, name: str, namespace: str | None) -> str | None:
    """`Client.get_pipeline_id`, but within `namespace` (it ignores namespaces, so a namespaced
    pipeline uploaded by an earlier `schedule` would not be found and uploading it again fails)."""
    flt = json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})  # 1 = EQUALS
    found = c.list_pipelines(filter=flt, namespace=namespace).pipelines or []
    if len(found) > 1:
        raise ValueError(f"several KFP pipelines are named {name!r}; delete the extras or rename the config")
    return found[0].pipeline_id if found else None


def _arguments(tracking_uri: str, init_policy_uri: str = "", init_reward_uri: str = "") -> dict[str, str]:
    """The run's parameters; a value carrying a credential is refused (KFP stores and shows them)."""
    args = {"tracking_uri": tracking_uri, "init_policy_uri": init_policy_uri, "init_reward_uri": init_reward_uri}
    for name, value in args.items():
        refuse_credentials(value, f"--{name.replace('_', '-')}")
    return args


# robfig/cron (the KFP backend's parser), seconds first: (name, lowest, highest, names)
_CRON_FIELDS = (("seconds", 0, 59, ()), ("minutes", 0, 59, ()), ("hours", 0, 23, ()),
                ("day of month", 1, 31, ()),
                ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
                ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")))
MAX_CONCURRENCY = 10  # the KFP backend accepts 1..10 concurrent runs of a recurring run


def validate_schedule(cron: str, max_concurrency: int) -> None:
    """ValueError naming the field, before anything is uploaded: the server would refuse the
    recurring run only after the pipeline version was created."""
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(f"--cron needs 6 fields (seconds first), e.g. '0 0 2 * * *'; got {cron!r}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            base, slash, step = part.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"--cron {cron!r}: {name} field {text!r}: step {step!r} is not a positive number")
            if base in ("*", "?"):
                continue
            ends = base.split("-")
            values = []
            for end in ends:
                up = end.upper()
                if up in names:
                    values.append(lo + names.index(up) if name == "day of week" else 1 + names.index(up))
                elif end.isdigit():
                    values.append(int(end))
                else:
                    raise ValueError(f"--cron {cron!r}: {name} field {text!r}: {end!r} is not a number")
            if len(values) > 2 or any(not lo <= v <= hi for v in values) or values != sorted(values):
                raise ValueError(f"--cron {cron!r}: {name} field {text!r} is not within {lo}-{hi}")
    if not 1 <= max_concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"--max-concurrency {max_concurrency}: the KFP backend allows 1 to {MAX_CONCURRENCY}")


def _quiet(fn):
    """kfp.Client prints "Experiment details"/"Run details" links to stdout: send them to stderr, so
    stdout carries only kfp-grpo's own result (`--output json` stays parseable)."""
    import contextlib
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args, **kwargs)
    return wrapper


@_quiet
def submit(cfg: Config, host: str | None = None, token: str | None = None, experiment: str = "kfp-grpo",
           run_name: str | None = None, tracking_uri: str = "", namespace: str | None = None,
           service_account: str | None = None, init_policy_uri: str = "", init_reward_uri: str = "",
           wait_s: int | None = None) -> dict[str, str]:
    """Compile `cfg` and create one run on the KFP endpoint.

    Returns {"run_id", "url"} (the run's page in the KFP UI), and with `wait_s` (seconds) also
    "state", the run's final state (SUCCEEDED, FAILED, ...) after waiting for it.
    """
    from pipelines.pipeline import compile_pipeline

    arguments = _arguments(tracking_uri, init_policy_uri, init_reward_uri)
    c = _client(host, token, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, str(Path(tmp) / "pipeline.yaml"))
        result = c.create_run_from_pipeline_package(
            package, arguments=arguments,
            run_name=run_name or cfg.name, experiment_name=experiment, namespace=namespace,
            enable_caching=False, service_account=service_account or cfg.cluster.service_account)
    run = {"run_id": result.run_id, "url": f"{c._get_url_prefix()}/#/runs/details/{result.run_id}"}  # as kfp links it
    if wait_s is not None:
        try:
            run["state"] = str(c.wait_for_run_completion(result.run_id, timeout=wait_s, sleep_duration=POLL_S).state)
        except TimeoutError:
            run["state"] = f"STILL RUNNING after {wait_s} s"
    return run


@_quiet
def schedule(cfg: Config, host: str | None = None, token: str | None = None, experiment: str = "kfp-grpo",
             cron: str = "0 0 2 * * *", job_name: str | None = None, max_concurrency: int = 1,
             tracking_uri: str = "", namespace: str | None = None, service_account: str | None = None,
             from_champion: bool = True) -> str:
    """Upload the pipeline (a new version if it exists) and create a recurring run; returns its id.

    Each run starts from the current champion policy/reward model when one exists
    (`models:/<prefix>-policy@champion`), so retraining continues the loop.
    """
    from pipelines.pipeline import compile_pipeline

    validate_schedule(cron, max_concurrency)
    init = champion_uris(cfg) if from_champion else {}
    params = _arguments(tracking_uri, **init)
    c = _client(host, token, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, str(Path(tmp) / "pipeline.yaml"))
        pipeline_id = _pipeline_id(c, cfg.name, namespace)
        # version names are unique per pipeline on the server: the config hash says what, the time when
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        version_name = f"{cfg.name}-{cfg.hash()}-{stamp}-{secrets.token_hex(2)}"
        if pipeline_id is None:
            pipeline = c.upload_pipeline(package, pipeline_name=cfg.name, namespace=namespace)
            pipeline_id = pipeline.pipeline_id
            version_id = c.list_pipeline_versions(pipeline_id).pipeline_versions[0].pipeline_version_id
        else:
            version_id = c.upload_pipeline_version(package, pipeline_version_name=version_name,
                                                   pipeline_id=pipeline_id).pipeline_version_id
    exp = c.create_experiment(experiment, namespace=namespace)  # get-or-create; real errors propagate
    job = c.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=job_name or f"{cfg.name}-retrain", cron_expression=cron,
        max_concurrency=max_concurrency, no_catchup=True, pipeline_id=pipeline_id, version_id=version_id,
        params=params, enable_caching=False,
        service_account=service_account or cfg.cluster.service_account)
    return job.recurring_run_id
