"""--resume after a killed driver whose saved state names a checkpoint Tune deleted since (a newer
one arrived while the loss went up): the trial resumes from the newest checkpoint that exists."""

import json

import pyarrow.fs
from ray import cloudpickle
from ray.train import Checkpoint, CheckpointConfig
from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

from lora_rank_search.search.storage import repair_stale_checkpoints


def _state(experiment, manager) -> None:
    runtime = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": cloudpickle.dumps(manager).hex()}}
    data = {"trial_data": [[json.dumps({"relative_logdir": "r8"}), json.dumps(runtime)]], "runner_data": {}}
    (experiment / "experiment_state-2026-12-06_03-58-00.json").write_text(json.dumps(data))


def _latest(experiment) -> str:
    data = json.loads((experiment / "experiment_state-2026-12-06_03-58-00.json").read_text())
    runtime = json.loads(data["trial_data"][0][1])
    manager = cloudpickle.loads(bytes.fromhex(runtime["checkpoint_manager"]["value"]))
    return manager.latest_checkpoint_result.checkpoint.path


def test_a_saved_latest_checkpoint_deleted_since_falls_back_to_the_newest_that_exists(tmp_path):
    experiment = tmp_path / "interrupted"
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"))
    fs = pyarrow.fs.LocalFileSystem()
    for index, (step, loss) in enumerate([(30, 3.0), (60, 2.0), (90, 2.5)]):
        folder = experiment / "r8" / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder), filesystem=fs), {"step": step, "eval_loss": loss}))
    _state(experiment, manager)  # saved: latest = step 90 (checkpoint_000002)
    # then a step-120 checkpoint arrived, step 90's (not among the best two) was deleted, the driver was killed
    (experiment / "r8" / "checkpoint_000002").rmdir()

    said = repair_stale_checkpoints(str(experiment))
    assert said == ["resume: r8: its saved latest checkpoint (checkpoint_000002) was deleted after the state was saved;"
                    " it resumes from its step-60 checkpoint"]
    assert _latest(experiment).endswith("checkpoint_000001")
    assert repair_stale_checkpoints(str(experiment)) == [], "nothing left to repair"


def test_a_state_whose_checkpoints_exist_is_left_as_it_is(tmp_path):
    experiment = tmp_path / "interrupted"
    folder = experiment / "r8" / "checkpoint_000000"
    folder.mkdir(parents=True)
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder)), {"step": 30}))
    _state(experiment, manager)
    before = (experiment / "experiment_state-2026-12-06_03-58-00.json").read_text()
    assert repair_stale_checkpoints(str(experiment)) == []
    assert (experiment / "experiment_state-2026-12-06_03-58-00.json").read_text() == before
    assert repair_stale_checkpoints(str(tmp_path / "nothing-here")) == []


def test_the_progress_line_names_the_step_of_the_checkpoint_a_trial_resumes_from(tmp_path):
    """After a repaired --resume the trial's last report (step 150) is later than the checkpoint it
    resumes from (step 90): the line said "resumed from step 150"."""
    import io

    from lora_rank_search.search.progress import ProgressPrinter

    class Trial:
        def __init__(self, name, last_step, checkpoint_step):
            self.name, self.last_result = name, {"step": last_step} if last_step else {}
            self.latest_checkpoint_result = None if checkpoint_step is None else _TrainingResult(
                checkpoint=Checkpoint(str(tmp_path)), metrics={"step": checkpoint_step})

        def __str__(self):
            return self.name

    out = io.StringIO()
    printer = ProgressPrinter(240, stream=out)
    for trial in (Trial("repaired", 150, 90), Trial("retried-without-one", 30, None), Trial("new", 0, None)):
        printer.on_trial_start(0, [], trial)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("repaired               resumed from step 90"), lines[0]
    assert lines[1].endswith("started") and lines[2].endswith("started"), lines
