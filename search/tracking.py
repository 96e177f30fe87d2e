"""Trackers: MLflow and Weights & Biases, through Ray Tune's own logger callbacks.

One tracker run per trial (its arm as params, every reported metric), grouped under the search: an
MLflow parent run named for the search (the trials' runs carry `mlflow.parentRunId`), a W&B group
named for the search. The verdict (rank, learning rate, targets, gain share, base loss) is logged
once per search, after the analysis: on the MLflow parent run, and as the summary of one W&B run of
`job_type: verdict` in the group.

A missing package is a config problem (before Ray starts) that says what to install. A tracker that
cannot be reached warns and the search goes on: without MLflow, and with W&B logging offline
(`wandb sync` uploads it later).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Callable, Optional
from urllib.parse import urlparse

from lora_rank_search.search.config import SearchConfig, warn

INSTALL = "pip install 'lora-rank-search[tracking]'"
REACH_TIMEOUT_S = 5.0
WANDB_HOST = "https://api.wandb.ai"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def problems(cfg: SearchConfig) -> list[str]:
    """Missing tracker packages, one line each naming what to install."""
    t, out = cfg.tracking, []
    if t.mlflow.tracking_uri and not _has("mlflow"):
        out.append(f"tracking.mlflow.tracking_uri: logging to MLflow needs the mlflow package: {INSTALL} "
                   "(or pip install mlflow-skinny)")
    elif t.mlflow.tracking_uri and t.mlflow.tracking_uri.startswith(("sqlite:", "postgresql:", "mysql:")) and not (
            _has("sqlalchemy") and _has("alembic")):
        out.append("tracking.mlflow.tracking_uri: a database store (sqlite:, postgresql:, mysql:) needs MLflow's database "
                   "parts, which mlflow-skinny lacks: pip install mlflow (or use a folder or a server)")
    if t.wandb.project and t.wandb.mode != "disabled" and not _has("wandb"):
        out.append(f"tracking.wandb.project: logging to W&B needs the wandb package: {INSTALL} (or pip install wandb)")
    return out


def mlflow_uri(uri: str) -> str:
    """A local folder as an absolute file: URI; sqlite:, file:, http(s): and other schemes as given."""
    if "://" in uri or uri.startswith(("sqlite:", "file:", "databricks")):
        return uri
    return "file://" + os.path.abspath(os.path.expanduser(uri))


def _quick_mlflow():
    """MLflow's HTTP client without its minutes of retries: a reachability check answers fast."""
    from lora_rank_search.search.isolation import environ

    return environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(REACH_TIMEOUT_S))})


def allow_folder(uri: str) -> None:
    """MLflow 3.x refuses a folder tracking store unless MLFLOW_ALLOW_FILE_STORE is set (the folder
    backend is in maintenance mode, not removed): a folder named in the config is that opt-in."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


def callbacks(cfg: SearchConfig, log: Callable[[str], None] = print) -> tuple[list, dict]:
    """Ray Tune logger callbacks for the configured trackers, and what to record in search_meta.json
    (where each tracker writes, the MLflow parent run's id) for logging the verdict later."""
    t, out, record = cfg.tracking, [], {}
    if t.mlflow.tracking_uri:
        uri = mlflow_uri(t.mlflow.tracking_uri)
        name = t.mlflow.experiment_name or cfg.name
        allow_folder(uri)
        try:
            from mlflow.tracking import MlflowClient

            with _quick_mlflow():
                client = MlflowClient(tracking_uri=uri)
                found = client.get_experiment_by_name(name)
                experiment_id = found.experiment_id if found else client.create_experiment(name)
                parent = client.create_run(experiment_id, run_name=cfg.name, tags={"lora_rank_search.role": "search"})
            record["mlflow"] = {"tracking_uri": uri, "experiment_name": name, "experiment_id": experiment_id,
                                "parent_run_id": parent.info.run_id}
            out.append(_mlflow_callback(record["mlflow"], cfg.name))
            log(f"tracking: MLflow at {uri}, experiment {name!r}, parent run {parent.info.run_id} (one child run per trial)")
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker must not stop the search
            warn(f"tracking.mlflow.tracking_uri: cannot reach {uri} ({type(exc).__name__}: "
                 f"{(str(exc).splitlines() or [''])[0][:160]}); the search goes on without MLflow")
    w = t.wandb
    if w.project and w.mode != "disabled":
        mode = w.mode
        host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
        if mode == "online" and not _reachable(host):
            warn(f"tracking.wandb: cannot reach {host}; the search goes on with W&B logging offline "
                 "(upload later with `wandb sync`)")
            mode = "offline"
        folder = wandb_dir(cfg)
        record["wandb"] = {"project": w.project, "entity": w.entity, "group": cfg.name, "mode": mode, "dir": folder}
        out.append(_wandb_callback(record["wandb"]))
        log(f"tracking: W&B project {w.project!r}, group {cfg.name!r}, {mode}, files under {folder}")
    return out, record


def resumed_callbacks(cfg: SearchConfig, record: dict, log: Callable[[str], None] = print) -> list:
    """The trackers of the first start (`record`, from search_meta.json), for a resumed search: the
    same MLflow parent run and W&B group, and each resumed trial logging on to its own run
    (`search.mlflow_callback`, `search.wandb_callback`). A tracker that cannot be set up warns and the search goes on."""
    out, where = [], []
    m = record.get("mlflow")
    if m:
        try:
            allow_folder(m["tracking_uri"])
            out.append(_mlflow_callback(m, cfg.name))
            where.append(f"MLflow parent run {m['parent_run_id']}")
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker must not stop the search
            warn(f"tracking.mlflow: cannot log the resumed trials ({type(exc).__name__}: {exc}); the search goes on without MLflow")
    w = record.get("wandb")
    if w:
        try:
            out.append(_wandb_callback(w))
            where.append(f"W&B group {w['group']!r}, {w['mode']}")
        except Exception as exc:  # noqa: BLE001 - as above
            warn(f"tracking.wandb: cannot log the resumed trials ({type(exc).__name__}: {exc}); the search goes on without W&B")
    if where:
        log(f"tracking: resumed: each trial logs on to its run of the first start ({'; '.join(where)})")
    return out


def _mlflow_callback(m: dict, search: str):
    """The MLflow callback of the search that search_meta.json's `tracking.mlflow` record (`m`) describes."""
    from lora_rank_search.search.mlflow_callback import MLflowLoggerCallback

    tags = {"mlflow.parentRunId": m["parent_run_id"], "lora_rank_search.search": search}
    return MLflowLoggerCallback(tracking_uri=m["tracking_uri"], experiment_name=m["experiment_name"], tags=tags, save_artifact=False)


def _wandb_callback(w: dict):
    """The W&B callback of the search that search_meta.json's `tracking.wandb` record (`w`) describes."""
    from lora_rank_search.search.wandb_callback import WandbLoggerCallback

    os.makedirs(w["dir"], exist_ok=True)
    kwargs = {"mode": w["mode"], "dir": w["dir"], **({"entity": w["entity"]} if w.get("entity") else {})}
    return WandbLoggerCallback(project=w["project"], group=w["group"], log_config=False, **kwargs)


def wandb_dir(cfg: SearchConfig) -> str:
    """Where W&B writes its run folders: tracking.wandb.dir, else the experiment folder (local
    storage), else ./wandb-NAME."""
    from lora_rank_search.search import storage

    if cfg.tracking.wandb.dir:
        return os.path.abspath(os.path.expanduser(cfg.tracking.wandb.dir))
    if not storage.is_uri(cfg.experiment_path):
        return os.path.abspath(cfg.experiment_path)
    return os.path.abspath(f"wandb-{cfg.name}")


@contextlib.contextmanager
def environment(record: dict):
    """WANDB_MODE for Ray's callback while the search runs (its API-key check reads it)."""
    mode = (record.get("wandb") or {}).get("mode")
    before = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = before


def end_parent(record: dict, status: str = "FINISHED") -> None:
    """Mark the MLflow parent run ended when the search ends (the verdict is logged onto it later)."""
    m = record.get("mlflow")
    if not m:
        return
    try:
        from mlflow.tracking import MlflowClient

        allow_folder(m["tracking_uri"])
        with _quick_mlflow():
            MlflowClient(tracking_uri=m["tracking_uri"]).set_terminated(m["parent_run_id"], status)
    except Exception as exc:  # noqa: BLE001
        warn(f"tracking.mlflow: could not end the search's run ({type(exc).__name__}: {exc})")


def verdict_fields(rec) -> tuple[dict, dict]:
    """(params, metrics) of the verdict: rank, learning rate, targets; gain share, base loss, loss."""
    import math

    params = {"recommended_rank": rec.rank, "recommended_learning_rate": rec.learning_rate,
              "recommended_targets": ",".join(rec.targets) if rec.targets else "",
              "recommended_target_choice": rec.target_choice, "rule": rec.rule_name}
    metrics = {"gain_share": rec.gain_share, "base_eval_loss": rec.base_eval_loss, "recommended_eval_loss": rec.loss,
               "evidence_step": rec.evidence_step}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    return {k: v for k, v in params.items() if v is not None and v == v}, metrics


def log_verdict(record: Optional[dict], rec, log: Callable[[str], None] = print) -> None:
    """Log the verdict once per search: onto the MLflow parent run, and as the summary of one W&B
    run (`job_type: verdict`) in the search's group. A tracker that fails warns only."""
    if not record:
        return
    params, metrics = verdict_fields(rec)
    m = record.get("mlflow")
    if m:
        try:
            from mlflow.tracking import MlflowClient

            allow_folder(m["tracking_uri"])
            with _quick_mlflow():
                client = MlflowClient(tracking_uri=m["tracking_uri"])
                for key, value in params.items():
                    client.log_param(m["parent_run_id"], key, value)
                for key, value in metrics.items():
                    client.log_metric(m["parent_run_id"], key, value)
            log(f"tracking: verdict logged on MLflow run {m['parent_run_id']}")
        except Exception as exc:  # noqa: BLE001
            warn(f"tracking.mlflow: could not log the verdict ({type(exc).__name__}: {exc})")
    w = record.get("wandb")
    if w:
        try:
            import wandb

            run = wandb.init(project=w["project"], entity=w.get("entity"), group=w["group"], job_type="verdict",
                             name=f"{w['group']}-verdict", mode=w["mode"], dir=w["dir"], config=params, reinit="create_new")
            run.summary.update({**params, **metrics})
            run.finish()
            wandb.teardown()  # the files are written when this returns
            log(f"tracking: verdict logged as the summary of W&B run {run.id} ({w['mode']})")
        except Exception as exc:  # noqa: BLE001
            warn(f"tracking.wandb: could not log the verdict ({type(exc).__name__}: {exc})")
