"""Packs served to Tune trials: a Ray actor per GPU (per node on CPU) holds the base, the trials are its clients.

Ray Tune still sees one trial per arm, with its own name, folder, result.json, TensorBoard file,
checkpoints (PEFT format), pauses, stops and retries. What changes is where the arm trains: the
trial function (`lora_trial` given a plan runs `train_in_pack`) attaches its arm to the pack server of its GPU (its node on CPU),
asks it for the steps up to its next report (`advance`), and reports what comes back, checkpoint
included, as a trial alone would. The server (`PackServer`) trains whichever arms have asked, all
stacked in one step (`trainables.pack.Pack`); an arm that is held at a rung, paused or stopped asks
for nothing and leaves the batch at once, and a detached arm's memory goes back.

Resources: each client trial holds 1/N of its pack's resources (N = arms per worker), so Ray puts N
clients on one GPU; the server itself asks Ray for nothing and uses the GPU its clients were given.
The server is a detached named actor (its name keys the experiment, node and GPU), so it outlives
the client that started it; the driver kills the servers when the search ends (`stop_servers`).
A server that dies fails its clients' calls: Tune retries each trial from its own last checkpoint,
and the retried trial starts a new server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from lora_rank_search.contract.config import TrialSettings
from lora_rank_search.contract.metrics import checked_report
from lora_rank_search.trainables.data import TokenizedData

SERVER_PREFIX = "lrs-pack-"
NAMESPACE = "lora-rank-search"  # the servers' Ray namespace (named, detached actors need one)
LIVENESS_SECONDS = 10.0  # how often an idle server checks that its arms' trials are still alive


@dataclass(frozen=True)
class PackPlan:
    """How the search packs its arms (made by the driver, `search.runner.plan_packs`).

    Attributes:
        arms: arms per pack (N). threads: torch CPU threads of a pack.
        experiment: a token naming this search's servers. rows_per_pass: rows per stacked pass (None: by device).
        packs_per_node: packs on one node on CPU (a trial joins the least loaded); on a GPU, one per GPU.
        packs_per_gpu: packs on one GPU (a pack holds the fraction `gpus_per_trial` sets: 1 / that).
    """

    arms: int
    threads: int
    experiment: str
    rows_per_pass: Optional[int] = None
    packs_per_node: int = 1
    packs_per_gpu: int = 1


@dataclass(frozen=True)
class StoredData:
    """The search's tokenized data, put once in Ray's object store by the driver (`ref`). A packed
    trial only passes it on to its pack server, which alone deserializes it: a client process holds
    none of the dataset."""

    ref: Any


def read_folder(folder: str) -> dict[str, bytes]:
    """Every file of a folder: relative path -> bytes (how checkpoints travel between client and server)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_folder(files: dict[str, bytes], folder: Path) -> Path:
    for name, content in files.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return Path(folder)


class PackServer:
    """One pack, trained by a single thread; client calls only queue work and wait for it.

    Args:
        settings, data: the search's (as every trial gets them).
        plan: the driver's `PackPlan`.
        gpu: the CUDA device id the clients were given ('' on CPU).
    """

    def __init__(self, settings: TrialSettings, data: TokenizedData, plan: PackPlan, gpu: str = ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch starts CUDA: the clients' GPU, or none
        from lora_rank_search.trainables.trial import quiet_libraries

        quiet_libraries()
        self.settings, self.data, self.plan = settings, data, plan
        self.pack = None
        self.started = time.time()
        self.load_seconds = 0.0
        self._cond = threading.Condition()
        self._adds: dict[str, tuple] = {}  # key -> (config, checkpoint files or None, client actor id)
        self._removes: set = set()
        self._wanted: dict[str, int] = {}  # key -> the step its client waits for
        self._done: dict[str, Any] = {}  # key -> what its client's call returns (or an exception)
        self._clients: dict[str, str] = {}  # key -> the client trial's actor id
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._loop, name="pack", daemon=True).start()

    # ---- client calls (any thread)

    def attach(self, key: str, config: dict, checkpoint: Optional[dict] = None, client: str = "") -> dict:
        """Add an arm (fresh, or from its checkpoint's files); returns {'step', 'load_seconds', 'pid'}."""
        return self._call(key, lambda: self._adds.__setitem__(key, (config, checkpoint, client)))

    def advance(self, key: str, until: int) -> tuple:
        """Train the arm to step `until` and evaluate it there: ('ok', metrics, checkpoint files), or
        ('failed', metrics, None) when it diverged or ran out of memory."""
        return self._call(key, lambda: self._wanted.__setitem__(key, int(until)))

    def detach(self, key: str) -> None:
        with self._cond:
            self._removes.add(key)
            self._wanted.pop(key, None)
            self._cond.notify_all()

    def arms(self) -> list:
        """The keys of the arms in the pack (for tests and benches)."""
        return sorted(self.pack.arms) if self.pack else []

    def load(self) -> int:
        """Arms in the pack or on their way in (a new trial joins the least loaded pack of its node)."""
        with self._cond:
            return len(self._clients) + len(self._adds)

    def active(self) -> int:
        """Arms training now or on their way in (held and paused arms ask for nothing): what a client
        compares to move to a less busy pack of its node (`train_in_pack`)."""
        with self._cond:
            return len(self._wanted) + len(self._adds)

    def parallel(self) -> int:
        """Arms this pack trains at full speed at once: all of them when they stack on a GPU (a small
        arm's step leaves the card idle), one when they take turns or on CPU (a stacked pass costs
        nearly what its arms' passes cost one by one). The scheduler's confirmations count free
        capacity by it (`search.confirm.free_slots`)."""
        from lora_rank_search.trainables.pack import STACKED

        stacked_on_gpu = self.pack is not None and self.pack.mode == STACKED and str(self.pack.device).startswith("cuda")
        return self.plan.arms if stacked_on_gpu else 1

    def _call(self, key: str, enqueue) -> Any:
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"the pack server failed: {self._error!r}")
            self._done.pop(key, None)
            enqueue()
            self._cond.notify_all()
            while key not in self._done:
                self._cond.wait()
            out = self._done.pop(key)
        if isinstance(out, BaseException):
            raise out
        return out

    # ---- the training thread

    def _loop(self) -> None:
        checked = time.time()
        while True:
            with self._cond:
                while not (self._adds or self._removes or self._wanted):
                    if not self._cond.wait(timeout=LIVENESS_SECONDS):
                        self._drop_dead_clients()
                adds, self._adds = self._adds, {}
                removes, self._removes = self._removes, set()
                wanted = dict(self._wanted)
            try:
                self._work(adds, removes, wanted)
            except Exception as exc:  # noqa: BLE001 - the pack is broken: fail its waiting clients
                import traceback

                traceback.print_exc()
                self._fail_all(exc)
            if time.time() - checked > LIVENESS_SECONDS:
                checked = time.time()
                self._drop_dead_clients()

    def _work(self, adds: dict, removes: set, wanted: dict) -> None:
        import torch

        from lora_rank_search.trainables.pack import Pack

        for key in removes:
            if self.pack is not None:
                self.pack.remove(key)
            self._clients.pop(key, None)
        for key, (config, files, client) in adds.items():
            try:
                if self.pack is None:
                    self.pack = Pack(self.settings, self.data, threads=self.plan.threads, rows_per_pass=self.plan.rows_per_pass)
                    self.load_seconds = self.pack.load_seconds
                tick = time.time()
                folder = write_folder(files, Path(tempfile.mkdtemp(prefix="lrs-attach-"))) if files else None
                try:
                    arm = self.pack.add(key, config, str(folder) if folder else None)
                finally:
                    if folder:
                        shutil.rmtree(folder, ignore_errors=True)
                self._clients[key] = client
                self._deliver(key, {"step": arm.step, "load_seconds": self.load_seconds + time.time() - tick, "pid": os.getpid(),
                                    "parallel": self.parallel()})
            except Exception as exc:  # noqa: BLE001 - this arm cannot join; its client raises it
                self._deliver(key, RuntimeError(f"pack server: cannot add the arm: {type(exc).__name__}: {exc}"))
        if self.pack is None:
            return
        active = [k for k, until in wanted.items() if k in self.pack.arms and self.pack.arms[k].step < until]
        if active:
            for key in self.pack.train_step(active):
                self._deliver(key, ("failed", self.pack.failure_report(key), None))
                self.pack.remove(key)
        due = [k for k, until in wanted.items() if k in self.pack.arms and self.pack.arms[k].step >= until]
        if not due:
            return
        try:
            reports = self.pack.report(due)
        except torch.OutOfMemoryError:
            reports = {}
            for key in due:  # one at a time; an arm that still runs out of memory fails alone
                try:
                    reports.update(self.pack.report([key]))
                except torch.OutOfMemoryError:
                    self._oom_in_eval(key)
        for key, metrics in reports.items():
            if metrics["trial_status"] != "ok":
                self._deliver(key, ("failed", metrics, None))
                self.pack.remove(key)
                continue
            folder = Path(tempfile.mkdtemp(prefix="lrs-pack-ckpt-"))
            try:
                metrics["adapter_bytes"] = self.pack.save(key, folder)
                files = read_folder(str(folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            self._deliver(key, ("ok", metrics, files))

    def _oom_in_eval(self, key: str) -> None:
        from lora_rank_search.trainables.failures import OOM, out_of_memory_detail

        arm = self.pack.arms[key]
        detail = out_of_memory_detail(self.pack.device, arm.step, True, arm.r, self.settings.train.batch_size, max(self.pack.lengths))
        self._deliver(key, ("failed", {**self.pack.failure_report(key), "step": arm.step, "trial_status": OOM, "failure": detail}, None))
        self.pack.remove(key)

    def _deliver(self, key: str, out: Any) -> None:
        with self._cond:
            self._wanted.pop(key, None)
            self._done[key] = out
            self._cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        """A step failed for a reason that is not one arm's (a bug, a broken device): every waiting
        client raises it, and Tune retries each trial from its own checkpoint (in a new server)."""
        with self._cond:
            self._error = exc
            for key in list(self._wanted) + list(self._adds):
                self._done[key] = RuntimeError(f"the pack server failed: {type(exc).__name__}: {exc}")
            self._wanted.clear()
            self._adds.clear()
            self._cond.notify_all()
        os._exit(1)  # noqa: SLF001 - a new server starts clean; this one's state cannot be trusted

    def _drop_dead_clients(self) -> None:
        """Free the arms whose trial process is gone (stopped or paused by Tune without detaching)."""
        try:
            from ray._private.state import actors
        except ImportError:  # pragma: no cover
            return
        with self._cond:
            idle = [k for k in self._clients if k not in self._wanted and k not in self._adds]
        for key in idle:
            try:
                state = actors(self._clients[key]).get("State")
            except Exception:  # noqa: BLE001 - no state to read: keep the arm
                continue
            if state == "DEAD":
                with self._cond:
                    self._removes.add(key)
                    self._cond.notify_all()


def node_servers(settings: TrialSettings, data: StoredData | TokenizedData, plan: PackPlan) -> list:
    """The pack servers of this trial's GPU (`plan.packs_per_gpu`) or, on CPU, of its node (`plan.packs_per_node`),
    started if there are none yet (a `StoredData` reaches the server as its data: Ray resolves an
    object reference passed as an argument in the process that receives it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    gpu = ",".join(str(g) for g in ray.get_gpu_ids()) if ray.get_gpu_ids() else ""
    if gpu:  # a pack per GPU, or per the fraction of one that gpus_per_trial sets
        slots = [f"gpu{gpu.replace(',', '_')}" + (f"-{i}" if i else "") for i in range(max(1, plan.packs_per_gpu))]
    else:
        slots = [f"cpu{i}" for i in range(max(1, plan.packs_per_node))]

    def start(slot: str):
        actor = ray.remote(PackServer).options(
            name=f"{SERVER_PREFIX}{plan.experiment}-{node[:12]}-{slot}", namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached",
            num_cpus=0, num_gpus=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        )
        return actor.remote(settings, data.ref if isinstance(data, StoredData) else data, plan, gpu)

    return [start(slot) for slot in slots]


def least_loaded(servers: list, key: str = ""):
    """The server with the fewest arms (attached or on their way in). Trials that arrive together
    all read the same loads before any of them attaches, so ties go by the trial's number (Tune's
    trial ids end in it: `..._00003`), which spreads consecutive trials over equal packs one each."""
    import ray

    if len(servers) == 1:
        return servers[0]
    loads = ray.get([s.load.remote() for s in servers])
    least = [i for i, load in enumerate(loads) if load == min(loads)]
    return servers[least[trial_number(key) % len(least)]]


def trial_number(key: str) -> int:
    """The number a Tune trial id ends in (`a1b2c_00003` -> 3), else a stable hash of the id."""
    import re
    import zlib

    digits = re.search(r"(\d+)$", key)
    return int(digits.group(1)) if digits else zlib.crc32(key.encode())


def less_busy(active: Sequence[int], here: int) -> Optional[int]:
    """The pack (index) an arm about to train should move to, or None to stay: another pack of its
    node with fewer arms training than its own pack has beside it. After a rung decision the arms
    that go on can sit in one pack while another idles; moving costs one adapter restore from the
    checkpoint the arm just reported (exact, as a resume is)."""
    others = [i for i in range(len(active)) if i != here]
    if not others:
        return None
    best = min(others, key=lambda i: (active[i], i))
    return best if active[best] < active[here] else None


def pack_to_move_to(servers: list, mine) -> Optional[Any]:
    """`less_busy` over the node's pack servers (their `active` counts): a server handle, or None."""
    import ray

    if len(servers) < 2 or mine not in servers:
        return None
    choice = less_busy(ray.get([s.active.remote() for s in servers]), servers.index(mine))
    return None if choice is None else servers[choice]


def stop_servers(experiment: str) -> int:
    """Kill this search's pack servers (the driver, when the search ends); returns how many."""
    import ray

    killed = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == NAMESPACE and entry.get("name", "").startswith(f"{SERVER_PREFIX}{experiment}-"):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE))
                killed += 1
            except ValueError:
                pass
    return killed


def packed_trial(config: dict, settings: Optional[TrialSettings] = None, data: Any = None,
                 plan: Optional[PackPlan] = None) -> None:
    """`trainables.trial.lora_trial` under the name Tune recorded for packed searches started before
    both modes shared that name (`search.runner.build_tuner` resumes them with it)."""
    from lora_rank_search.trainables.trial import lora_trial

    lora_trial(config, settings, data, plan)


def train_in_pack(config: dict, settings: TrialSettings, data: StoredData, plan: PackPlan) -> None:
    """The body of a Tune trial whose arm trains in its node's pack (`lora_trial` with a plan; the
    data as `StoredData(ray.put(...))`). Reports as a trial alone does."""
    import ray
    from ray import tune

    from lora_rank_search.trainables.pack import next_report_step
    from lora_rank_search.trainables.trial import exit_quietly_on_sigterm, on_this_node, process_metrics, quiet_libraries
    from lora_rank_search.trainables.trial import restorable_checkpoint, saved_step

    quiet_libraries(transformers=False)  # the client loads no model; its server does
    exit_quietly_on_sigterm()
    started = time.time()
    settings = on_this_node(settings)
    max_steps = settings.train.max_steps
    checkpoint, files = tune.get_checkpoint(), None
    if checkpoint is not None:
        local = restorable_checkpoint(checkpoint)
        try:
            if saved_step(local) >= max_steps:
                return  # it had finished when its driver was killed
            files = read_folder(local)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    key = tune.get_context().get_trial_id()
    client = ray.get_runtime_context().get_actor_id() or ""
    servers = node_servers(settings, data, plan)
    server = least_loaded(servers, key)
    attached = ray.get(server.attach.remote(key, config, files, client))
    here = process_metrics(started, attached["load_seconds"])
    here.update(train_pid=attached["pid"], pack_arms=plan.arms, pack_parallel=attached["parallel"])
    step, last = attached["step"], {}
    try:
        while step < max_steps:
            other = pack_to_move_to(servers, server) if files else None
            if other is not None:  # move with the checkpoint just reported (exact: tests/test_pack_search.py)
                server.detach.remote(key)
                server = other
                moved = ray.get(server.attach.remote(key, config, files, client))
                here.update(train_pid=moved["pid"], pack_parallel=moved["parallel"])
            status, metrics, files = ray.get(server.advance.remote(key, next_report_step(step, settings)))
            if status != "ok":  # over the last report's values, as a trial alone reports its failure
                tune.report(checked_report({**here, **last, **metrics, "elapsed_s": time.time() - started}))
                return
            metrics = last = {**here, **metrics, "elapsed_s": time.time() - started}
            folder = write_folder(files, Path(tempfile.mkdtemp(prefix="lrs-ckpt-")))
            try:
                tune.report(checked_report(metrics), checkpoint=tune.Checkpoint.from_directory(str(folder)))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            step = int(metrics["step"])
    finally:
        try:
            server.detach.remote(key)
        except Exception:  # noqa: BLE001 - the server is gone: nothing to free
            pass

