"""A TensorBoard log folder built from what the experiment has on disk, and serving it locally.

Ray's TBXLoggerCallback already writes scalars into each trial folder, but (Ray 2.60) with the
*training iteration* as x-axis, not the optimizer step, and HParams with only the grid-searched
values (r, seed: constants such as alpha and targets are not "evaluated params") and only for
trials that ended while the driver ran (not for interrupted ones). So `write_logdir` writes its
own folder, one run per trial:
- scalars by optimizer step: loss/eval, loss/train, loss/eval_best, eval/perplexity, optim/lr,
  speed/tokens_per_s, memory/peak_bytes, data/tokens_seen;
- HParams: r, lora_alpha, alpha_rule, targets, seed, status, stopped_early -> final/eval_loss,
  final/best_eval_loss, final/steps, for every trial that reported (early-stopped ones included);
  one experiment summary at the root declares them (with the values seen) for the dashboard.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import pandas as pd

from lora_rank_search.contract import storage
from lora_rank_search.contract.arms import CHOICE_KEY, LR_KEY, NUISANCE_KEYS, RANK_KEY, REPLICATE_KEY
from lora_rank_search.contract.metrics import TENSORBOARD_TAGS

MARKER = ".lora-rank-tensorboard"  # only a folder holding this marker is ever cleared
DEFAULT_HOST = "127.0.0.1"  # this machine only; view from elsewhere with `ssh -L 6006:127.0.0.1:6006`
DEFAULT_PORT = 6006
SCALARS = TENSORBOARD_TAGS  # history column -> tag, as contract.metrics declares them
FINAL_METRICS = {"final/eval_loss": "final_eval_loss", "final/best_eval_loss": "best_eval_loss", "final/steps": "steps"}
STRING_HPARAMS = ("alpha_rule", CHOICE_KEY, "targets", "status")
FURTHER_NUISANCE = tuple(k for k in NUISANCE_KEYS if k != LR_KEY)  # an HParam only in searches that have it
NUMBER_HPARAMS = (RANK_KEY, LR_KEY, "lora_alpha", REPLICATE_KEY, *FURTHER_NUISANCE)  # the arm's coordinates (contract.arms)


# trial status (analysis.results) -> HParams session status (tensorboard's api.proto has only
# UNKNOWN, SUCCESS, FAILURE, RUNNING). Interrupted and pending trials have not ended: they resume
# with `lora-rank search --resume`, so UNKNOWN; the `status` hparam carries the exact word.
SESSION_STATUS = {
    "completed": "STATUS_SUCCESS",
    "stopped": "STATUS_SUCCESS",  # stopped early by the scheduler: it ended as designed
    "error": "STATUS_FAILURE",
    "diverged": "STATUS_FAILURE",
    "oom": "STATUS_FAILURE",
    "interrupted": "STATUS_UNKNOWN",
    "pending": "STATUS_UNKNOWN",
}


def session_status(status: str) -> str:
    """The HParams session status for a trial status (STATUS_UNKNOWN for one not listed)."""
    return SESSION_STATUS.get(status, "STATUS_UNKNOWN")


def _hparams(row) -> dict:
    out = {}
    for key in NUMBER_HPARAMS:
        value = getattr(row, key, None)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
    for key in STRING_HPARAMS:
        out[key] = str(getattr(row, key, ""))
    out["stopped_early"] = bool(getattr(row, "stopped_early", False))
    return out


def _summary(content, tag: str):
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _experiment_summary(trials: pd.DataFrame):
    from tensorboardX.proto.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    infos = []
    for key in NUMBER_HPARAMS:
        if key in FURTHER_NUISANCE and key not in trials:
            continue
        infos.append(HParamInfo(name=key, type=DataType.Value("DATA_TYPE_FLOAT64")))
    for key in STRING_HPARAMS:
        info = HParamInfo(name=key, type=DataType.Value("DATA_TYPE_STRING"))
        info.domain_discrete.extend(sorted({str(v) for v in trials[key]}) if key in trials else [])
        infos.append(info)
    infos.append(HParamInfo(name="stopped_early", type=DataType.Value("DATA_TYPE_BOOL")))
    metrics = [MetricInfo(name=MetricName(tag=tag), display_name=tag) for tag in FINAL_METRICS]
    content = HParamsPluginData(experiment=Experiment(hparam_infos=infos, metric_infos=metrics), version=0)
    return _summary(content, "_hparams_/experiment")


def _session(row):
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo

    start = SessionStartInfo(group_name=str(row.trial_dir))
    for key, value in _hparams(row).items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, float):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = value
    end = SessionEndInfo(status=Status.Value(session_status(str(row.status))))
    return (_summary(HParamsPluginData(session_start_info=start, version=0), "_hparams_/session_start_info"),
            _summary(HParamsPluginData(session_end_info=end, version=0), "_hparams_/session_end_info"))


def default_logdir(experiment: str) -> str:
    """`<experiment>/tensorboard` for a local experiment; a local folder for a remote one."""
    if storage.is_uri(experiment):
        return os.path.abspath(f"tensorboard-{experiment.rstrip('/').rsplit('/', 1)[-1]}")
    return os.path.join(experiment, "tensorboard")


def write_logdir(trials: pd.DataFrame, history: pd.DataFrame, logdir: str) -> list[str]:
    """(Re)write the log folder: one run per trial that reported; returns the run names."""
    from tensorboardX import SummaryWriter

    if os.path.isdir(logdir) and os.listdir(logdir):
        if not os.path.exists(os.path.join(logdir, MARKER)):
            raise FileExistsError(f"--logdir: {logdir!r} exists and was not written by lora-rank; choose another folder")
        shutil.rmtree(logdir)
    os.makedirs(logdir, exist_ok=True)
    open(os.path.join(logdir, MARKER), "w").close()
    runs = []
    root = SummaryWriter(logdir)
    root.file_writer.add_summary(_experiment_summary(trials))
    root.close()
    for row in trials.itertuples():
        h = history[history["trial_id"].astype(str) == str(row.trial_id)].sort_values("step") if not history.empty else history
        if h.empty:
            continue
        writer = SummaryWriter(os.path.join(logdir, str(row.trial_dir)))
        for column, tag in SCALARS.items():
            if column not in h:
                continue
            for step, value in zip(h["step"], h[column]):
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    writer.add_scalar(tag, float(value), global_step=int(step))
        for tag, column in FINAL_METRICS.items():
            value = getattr(row, column, math.nan)
            if value is not None and math.isfinite(float(value)):
                writer.add_scalar(tag, float(value), global_step=int(row.steps))
        for summary in _session(row):
            writer.file_writer.add_summary(summary)
        writer.close()
        runs.append(str(row.trial_dir))
    return runs


def serve(logdir: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True) -> str:
    """Start TensorBoard on host:port over `logdir`; returns its URL (blocks until Ctrl-C if `block`)."""
    import time

    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", logdir, "--host", host, "--port", str(port)])
    url = board.launch()
    if block:
        print(f"TensorBoard at {url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return url


def read_back(logdir: str, run: str) -> tuple[dict, Optional[dict]]:
    """({tag: {step: value}}, hparams or None) of one run: what TensorBoard will show."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(os.path.join(logdir, run), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    hparams = None
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {}
            for key, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                hparams[key] = getattr(value, kind)
    return scalars, hparams
