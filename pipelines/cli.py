"""`kfp-grpo`: run the pipeline locally, compile it, submit or schedule it on KFP, promote, run a stage.

Every command prints one `error: ...` line and exits 2 on bad input (config, arguments,
files), 1 when a run or a remote endpoint fails; `--output json` prints a machine-readable
result instead of text.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from components.config import STAGES, Config, ConfigError, load_config, parse_set
from components.errors import KfpGrpoError
from components.redaction import error_line, register_secret, scrub
from components.stage_cli import HelpFormatter
from pipelines.local import PipelineFailed


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, parse_set(args.set))


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded pipelines/configs/tiny.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config value, e.g. --set grpo.beta=0.02 (repeatable)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=["text", "json"], default="text",
                   help="print the result as text or as one JSON object (for scripts)")


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-policy-uri", default="",
                   help="start from this policy instead of SFT, e.g. models:/kfp-grpo-policy@champion")
    p.add_argument("--init-reward-uri", default="",
                   help="start from this reward model (and its replay buffer), e.g. models:/kfp-grpo-reward@champion")
    p.add_argument("--from-champion", action="store_true",
                   help="shorthand: start policy and reward model from the current champions (if any)")


def _init_args(args: argparse.Namespace, cfg: Config) -> dict[str, str]:
    from pipelines.client import champion_uris

    if args.from_champion:
        return champion_uris(cfg)
    return {"init_policy_uri": args.init_policy_uri, "init_reward_uri": args.init_reward_uri}


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import run_local

    cfg = _config(args)
    try:
        if args.runner == "docker":
            from pipelines.containers import run_in_containers

            summary = run_in_containers(cfg, Path(args.workdir), _init_args(args, cfg), args.resume or "",
                                        args.verbose, args.mlflow_image)
        else:
            summary = run_local(cfg, Path(args.workdir), _init_args(args, cfg), args.resume or "", args.verbose)
    except PipelineFailed as err:
        if err.parent_run_id:  # the same command, resuming the run: completed tasks are not run again
            argv, skip = [], False
            for a in getattr(args, "argv", None) or ["run", "--workdir", args.workdir]:
                if skip or a == "--resume" or a.startswith("--resume="):
                    skip = a == "--resume"
                    continue
                argv.append(a)
            command = " ".join(shlex.quote(a) for a in ["kfp-grpo", *argv, "--resume", err.parent_run_id])
            raise PipelineFailed(f"{err}; resume with: {command}", err.parent_run_id) from None
        raise
    print(scrub(json.dumps(summary, indent=2) if args.output == "json" else summary["text"]))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import compile_pipeline

    import shutil
    import tempfile

    from components.io import atomic_path

    cfg = _config(args)
    out = args.output or f"{cfg.name}.yaml"
    if not out.endswith(".yaml"):
        raise ValueError(f"-o {out}: a compiled pipeline is a .yaml file")
    # complete or absent, and it replaces only a pipeline kfp-grpo compiled (never a user's file)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out, is_dir=False) as part:
        shutil.copyfile(compile_pipeline(cfg, str(Path(tmp) / "pipeline.yaml")), part)
    print(f"wrote {out} ({cfg.loop.iterations} iterations × {cfg.loop.steps_per_iteration} rounds)")
    return 0


def _kfp_errors() -> tuple[type[BaseException], ...]:
    """What the KFP API client raises for a refused request or an unreachable endpoint
    (TimeoutError: kfp.Client's healthz probe gave up after its retries)."""
    import kfp_server_api
    import urllib3

    return kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError


def _kfp_failed(err: BaseException, host: str | None) -> int:
    """One line on stderr instead of a traceback; exit code 1 (2 is for bad arguments/config)."""
    where = host or "$KF_PIPELINES_ENDPOINT"
    status = getattr(err, "status", None)
    if status is None:
        msg = f"cannot reach the KFP API at {where}: {err}"
    else:
        detail = getattr(err, "body", None) or ""
        try:
            detail = json.loads(detail).get("message") or detail
        except (ValueError, AttributeError):
            pass
        msg = f"the KFP API at {where} answered {status} {getattr(err, 'reason', '') or ''}: {detail}"
    print(error_line(msg), file=sys.stderr)
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.client import submit

    cfg = _config(args)
    try:
        run = submit(cfg, host=args.host, token=args.token, experiment=args.experiment, run_name=args.run_name,
                     tracking_uri=args.tracking_uri, namespace=args.namespace, service_account=args.service_account,
                     wait_s=args.timeout if args.wait else None, **_init_args(args, cfg))
    except _kfp_errors() as err:
        return _kfp_failed(err, args.host)
    if args.output == "json":
        print(scrub(json.dumps(run)))
    else:
        print(scrub(f"submitted run {run['run_id']}: {run['url']}"))  # the URL holds --host (and its password)
        if args.wait:
            print(f"run {run['run_id']} finished: {run['state']}")
    return 0 if not args.wait or run["state"] == "SUCCEEDED" else 1


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.client import schedule

    cfg = _config(args)
    try:
        job_id = schedule(cfg, host=args.host, token=args.token, experiment=args.experiment, cron=args.cron,
                          job_name=args.job_name, max_concurrency=args.max_concurrency,
                          tracking_uri=args.tracking_uri, namespace=args.namespace,
                          service_account=args.service_account, from_champion=not args.from_scratch)
    except _kfp_errors() as err:
        return _kfp_failed(err, args.host)
    if args.output == "json":
        print(json.dumps({"recurring_run_id": job_id, "cron": args.cron, "max_concurrency": args.max_concurrency}))
    else:
        print(f"created recurring run {job_id} ({args.cron}, max concurrency {args.max_concurrency}, no catch-up)")
    return 0


def cmd_promote(args: argparse.Namespace, rest: list[str]) -> int:
    from components import promote

    return promote.main(rest, prog="kfp-grpo promote")


def stage_summaries() -> dict[str, str]:
    """Each stage's one-line description (its module docstring's first line, read without importing it)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "components"
    return {s: ast.get_docstring(ast.parse((root / f"{s}.py").read_text(encoding="utf-8"))).splitlines()[0]
            .removeprefix("Stage: ") for s in STAGES}


def cmd_stage(args: argparse.Namespace, rest: list[str]) -> int:
    from components import evaluate, grpo_update, prepare_data, promote, reward_model, rm_replay, rollout, sft

    mains = {"prepare_data": prepare_data.main, "sft": sft.main, "reward_model": reward_model.main,
             "rollout": rollout.main, "grpo_update": grpo_update.main, "rm_replay": rm_replay.main,
             "evaluate": evaluate.main, "promote": promote.main}
    return mains[args.name](rest)


def _add_kfp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--token", help="bearer token (default: kfp.Client's own auth, "
                                   "e.g. $KF_PIPELINES_SA_TOKEN_PATH in a cluster)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user KFP)")
    p.add_argument("--experiment", default="kfp-grpo", help="KFP experiment the run is filed under")
    p.add_argument("--tracking-uri", default="", help="MLflow URI passed to the run (default: from the "
                                                      "cluster's kfp-grpo-config ConfigMap)")
    p.add_argument("--service-account", default=None, help="service account for the run's pods")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    formatter = HelpFormatter
    p = argparse.ArgumentParser(prog="kfp-grpo", description="Iterative GRPO fine-tuning as a Kubeflow pipeline, "
                                "tracked in MLflow.", formatter_class=formatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {version('kfp-grpo')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the pipeline locally with kfp.local (embedded MLflow, CPU)",
                       formatter_class=formatter)
    _add_config(r)
    _add_init(r)
    r.add_argument("--workdir", default="kfp-grpo-runs", help="local outputs + embedded MLflow store")
    _add_output(r)
    r.add_argument("-v", "--verbose", action="store_true",
                   help="stream every task's output to the terminal too (it always goes to <workdir>/logs/)")
    r.add_argument("--resume", metavar="MLFLOW_RUN_ID",
                   help="continue an interrupted run (same --workdir, config and --set): completed tasks are skipped")
    r.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="subprocess: every task in this environment; docker: every task in the image its placement "
                        "names (cluster.images), through Docker or podman's Docker API (docker/README.md)")
    r.add_argument("--mlflow-image", default="", help="--runner docker: the MLflow server image "
                                                      "(default ghcr.io/kfp-grpo/mlflow-server:<version>)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compile", help="write the pipeline IR YAML for a config", formatter_class=formatter)
    _add_config(c)
    c.add_argument("-o", "--output", help="output file (default: <name>.yaml)")
    c.set_defaults(func=cmd_compile)

    s = sub.add_parser("submit", help="send one run to a KFP endpoint", formatter_class=formatter)
    _add_config(s)
    _add_kfp(s)
    _add_init(s)
    s.add_argument("--run-name", default=None, help="the run's display name in KFP (default: the config's name)")
    s.add_argument("--wait", action="store_true", help="wait for the run to finish; the exit code is its outcome "
                                                       "(0 SUCCEEDED, 1 otherwise)")
    s.add_argument("--timeout", type=int, default=24 * 3600, help="--wait: give up after this many seconds")
    _add_output(s)
    s.set_defaults(func=cmd_submit)

    sc = sub.add_parser("schedule", help="create a recurring run that continues from the champion",
                        formatter_class=formatter)
    _add_config(sc)
    _add_kfp(sc)
    sc.add_argument("--cron", default="0 0 2 * * *", help="6-field cron, seconds first (the default: daily 02:00)")
    sc.add_argument("--job-name", default=None, help="the recurring run's name in KFP (default: <config name>-retrain)")
    sc.add_argument("--max-concurrency", type=int, default=1, help="runs of the schedule allowed at the same time")
    sc.add_argument("--from-scratch", action="store_true", help="each run starts from SFT, not the champion")
    _add_output(sc)
    sc.set_defaults(func=cmd_schedule)

    pr = sub.add_parser("promote", help="register a model and run the promotion gate by hand", add_help=False)
    pr.set_defaults(func=cmd_promote, passthrough=True)

    summaries = stage_summaries()
    st = sub.add_parser("stage", help="run one stage (what a pipeline task runs); `kfp-grpo stage NAME --help`",
                        add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="kfp-grpo stage NAME [stage options]",
                        description="Run one stage of the pipeline by hand, on paths. Stages:\n" + "\n".join(
                            f"  {name:<13} {text}" for name, text in summaries.items()))
    st.add_argument("name", choices=list(STAGES), metavar="NAME")
    st.set_defaults(func=cmd_stage, passthrough=True)
    p.stage_parser = st  # `kfp-grpo stage [--help]` prints its list of stages
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if argv[:1] == ["stage"] and (len(argv) == 1 or argv[1] in ("-h", "--help")):  # the stage list
        p.stage_parser.print_help(sys.stdout if len(argv) > 1 else sys.stderr)
        return 0 if len(argv) > 1 else 2
    args, rest = p.parse_known_args(argv)
    args.argv = argv
    register_secret(getattr(args, "token", None))  # never printed, whatever fails
    try:
        if getattr(args, "passthrough", False):
            return args.func(args, rest)
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except (ConfigError, KfpGrpoError, ValueError, FileNotFoundError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except PipelineFailed as err:
        print(error_line(err), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
