"""Where the train stage runs: the device (`train.device`) and the tf.distribute strategy (`train.distribute`).

none: one process on one device. mirrored: tf.distribute.MirroredStrategy, one replica per GPU of this
machine (one replica on the CPU with train.device = cpu or without a GPU). multi_worker:
tf.distribute.MultiWorkerMirroredStrategy over several processes, usually one per machine, each started
with the same params and data; the cluster comes from the TF_CONFIG environment variable, as cluster
managers set it, or from `pipeline train --workers host:port,... --worker-index I` (`tf_config` builds it).

train.batch_size is the global batch: each step takes batch_size images in all, batch_size / replicas on
each replica, and the gradients are averaged over the replicas, so a step of N replicas is the step one
process takes on the same batch and the learning rate is used as given (not scaled with N).

Input: make_dataset's pipeline builds its batches inside flat_map from shuffled row indices (tf.gather), so
tf.data's FILE auto-sharding has no files to split; with the DATA policy (make_dataset sets it) tf.distribute
rebatches every global batch into per-replica slices in order and worker i keeps the i-th: every worker
computes the same global batches (the same shuffles and augmentation draws as one process, the input work
repeated on each worker), and a last batch with fewer rows than workers gives some workers an empty slice,
so every worker takes ceil(rows / batch_size) steps per epoch, which collective all-reduce needs (a worker
with one step fewer would leave the others waiting for it forever). Each replica's loss is the mean over
its slice and the replicas' means are averaged, so only a last partial batch split unevenly weighs its
images slightly differently from one process.

Only the chief (task index 0: the `chief` task, or worker 0 when there is none) logs to MLflow and writes
outputs; the others train and write nothing (train.py).

Multi-worker collectives must be configured before TensorFlow initialises its runtime: `cluster` and
`choose_device` run no TensorFlow op, and `place` creates the strategy before the stage runs any (the
seeding, op determinism and train.precision's probe all come after it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TF_CONFIG_SHAPE = ('{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}} '
                   '(optionally a "chief": ["host:port"] job)')
WORKER_WAIT = 600.0  # seconds a multi_worker process waits for all the workers to start, by default
ADDRESS = re.compile(r"^[A-Za-z0-9_.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")  # host:port or [ipv6]:port


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker training: `workers` processes in all, this one `rank`."""

    workers: int = 1
    rank: int = 0  # 0 = the chief

    @property
    def chief(self) -> bool:
        return self.rank == 0


@dataclass
class Placement:
    strategy: object  # the tf.distribute.Strategy the model is built, compiled and fitted under
    distribute: str  # train.distribute
    device: str  # "gpu" or "cpu": what the replicas run on
    tag: str  # the run's `device` tag: "gpu:<device names>" or "cpu:<CPU model>"
    replicas: int  # in all, over every worker
    cluster: Cluster = Cluster()

    @property
    def chief(self) -> bool:
        return self.cluster.chief


def tf_config(workers: str, index: int | None) -> str:
    """The TF_CONFIG JSON of worker `index` of `workers` ("host:port,host:port"); worker 0 is the chief."""
    addresses = [address.strip() for address in workers.split(",") if address.strip()]
    if not addresses:
        raise PipelineError(f"--workers = {workers!r}: expected host:port,host:port (one per worker, the chief first)")
    for address in addresses:
        if not ADDRESS.match(address):
            raise PipelineError(f"--workers: {address!r} is not host:port")
    if len(set(addresses)) != len(addresses):
        raise PipelineError(f"--workers = {workers!r}: an address appears twice")
    if index is None:
        raise PipelineError("--workers needs --worker-index (0 for the chief, which logs and writes the outputs)")
    if not 0 <= index < len(addresses):
        raise PipelineError(f"--worker-index = {index}: expected 0..{len(addresses) - 1} for {len(addresses)} workers")
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def cluster(distribute: str, environ=os.environ) -> Cluster:
    """This process's Cluster from TF_CONFIG for train.distribute = `distribute`; validated, no TensorFlow."""
    text = environ.get("TF_CONFIG", "").strip()
    if distribute != "multi_worker":
        if text:
            log.warning("TF_CONFIG is set but train.distribute = %s: this process trains alone", distribute)
        return Cluster()
    if not text:
        raise PipelineError("train.distribute = multi_worker needs the cluster: set TF_CONFIG "
                            "or run `pipeline train --workers host:port,... --worker-index I`")
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise PipelineError(f"TF_CONFIG is not JSON ({exc}); expected {TF_CONFIG_SHAPE}") from None
    jobs = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(jobs, dict) or not isinstance(task, dict) or not isinstance(jobs.get("worker", []), list):
        raise PipelineError(f"TF_CONFIG = {text[:200]}: expected {TF_CONFIG_SHAPE}")
    others = sorted(set(jobs) - {"chief", "worker"})
    if others:
        raise PipelineError(f"TF_CONFIG: jobs {others} are not supported; multi_worker runs 'chief' and 'worker' tasks")
    chiefs, workers = list(jobs.get("chief", [])), list(jobs.get("worker", []))
    if len(chiefs) > 1:
        raise PipelineError(f"TF_CONFIG: {len(chiefs)} chief tasks; expected at most one")
    kind, index = task.get("type"), task.get("index", 0)
    size = {"chief": len(chiefs), "worker": len(workers)}.get(kind)
    if size is None:
        raise PipelineError(f"TF_CONFIG: task type {kind!r}: expected 'chief' or 'worker'")
    if not isinstance(index, int) or not 0 <= index < size:
        raise PipelineError(f"TF_CONFIG: task index {index!r}: expected 0..{size - 1} for the {size} {kind} task(s)")
    return Cluster(workers=len(chiefs) + len(workers), rank=index if kind == "chief" else len(chiefs) + index)


def choose_device(setting: str) -> str:
    """'gpu' or 'cpu' for train.device = `setting`; hides the GPUs for 'cpu', turns on memory growth for 'gpu'.

    Runs no TensorFlow op (the device settings must precede the runtime's start). In a process whose
    runtime has started already (tests) the settings stay as they are and `place` pins the CPU instead.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if setting == "gpu" and not gpus:
        raise PipelineError("train.device = gpu: TensorFlow finds no GPU on this machine; "
                            "use train.device = auto (the GPU if there is one, else the CPU) or cpu")
    device = "gpu" if gpus and setting != "cpu" else "cpu"
    try:
        if device == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        for gpu in gpus if device == "gpu" else []:
            tf.config.experimental.set_memory_growth(gpu, True)  # take GPU memory as needed, not all at start
    except RuntimeError:  # "cannot be modified after being initialized"
        pass
    return device


def place(distribute: str, device_setting: str, where: Cluster | None = None, device: str | None = None,
          wait_seconds: float = WORKER_WAIT) -> Placement:
    """The strategy for train.distribute on train.device; create it before any other TensorFlow op.

    wait_seconds: how long a multi_worker process waits for every worker to start (register) before it fails.
    """
    import tensorflow as tf

    from pipeline.hardware import cpu_info

    where = where or cluster(distribute)
    device = device or choose_device(device_setting)
    # a runtime started before choose_device could hide them (tests) still shows the GPUs: pin the CPU
    pin_cpu = device == "cpu" and bool(tf.config.get_visible_devices("GPU"))
    if distribute == "none":
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0") if pin_cpu else tf.distribute.get_strategy()
    elif distribute == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"] if device == "cpu" else None)
    elif distribute == "multi_worker":
        if pin_cpu:
            raise PipelineError("train.device = cpu with multi_worker: the GPUs must be hidden before TensorFlow "
                                "starts; run it through `pipeline train`")
        _limit_registration(wait_seconds)
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.DeadlineExceededError:
            raise PipelineError(f"train.distribute = multi_worker: not every worker started within {wait_seconds:g} s "
                                "(pipeline train --worker-wait); start all of them, with the same --workers or "
                                "TF_CONFIG cluster") from None
        except (RuntimeError, ValueError) as exc:  # "Collective ops must be configured at program startup"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"train.distribute = multi_worker: cannot create the strategy ({first}); "
                                "it must come before any other TensorFlow op in the process") from None
    else:  # config validation keeps this unreachable
        raise PipelineError(f"train.distribute = {distribute!r} has no strategy")
    if device == "gpu":
        names = ",".join(d.name for d in tf.config.get_visible_devices("GPU"))
        tag = f"gpu:{names}"
    else:
        tag = f"cpu:{cpu_info()['model']}"
    return Placement(strategy, distribute, device, tag, int(strategy.num_replicas_in_sync), where)


def _limit_registration(seconds: float) -> None:
    """Configure TensorFlow's coordination service as MultiWorkerMirroredStrategy would, with a registration timeout.

    Without one a worker whose chief never starts (it failed its checks, or was never launched) waits for
    it for well over ten minutes (measured; 0 is TensorFlow's own default), blocked in C++ where SIGTERM's
    handler cannot run. The strategy configures the service only when nothing has (TensorFlow 2.21's
    collective_all_reduce_strategy.py); these are private modules, so if they move the strategy's own
    configuration, without the limit, applies.
    """
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError:
        log.debug("no coordination service settings in this TensorFlow: workers wait for each other without a limit")
        return
    spec = json.loads(os.environ["TF_CONFIG"])  # cluster() has checked it
    jobs = [job for job in ("chief", "worker") if spec["cluster"].get(job)]
    if context.context().coordination_service is None:
        context.context().configure_coordination_service(
            service_type="standalone",
            service_leader=f"/job:{jobs[0]}/replica:0/task:0",  # the chief, else worker 0: as the strategy has it
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(spec["cluster"][job]))
                              for job in jobs],
            cluster_register_timeout_in_ms=int(seconds * 1000),
        )


def gather_from_workers(placement: Placement, value: int) -> list[int]:
    """`value` as each worker has it, in rank order (a collective: every worker must call it); [value] alone."""
    if placement.cluster.workers == 1:
        return [value]
    import tensorflow as tf

    strategy = placement.strategy

    @tf.function  # the strategy runs collectives eagerly only slowly, with a warning
    def gather(mine):
        return strategy.gather(strategy.run(lambda: mine), axis=0)

    values = gather(tf.constant([value], "int64")).numpy().tolist()
    per_worker = len(values) // placement.cluster.workers  # each worker's replicas gave the same value
    return [int(v) for v in values[::per_worker]]


def lost_worker(exc: Exception) -> PipelineError | None:
    """The one-line error for a multi-worker training that stopped because a worker did; None for another error.

    A collective with a worker that has gone fails with UnavailableError: at once when its address refuses
    the connection, or when TensorFlow's coordination service has missed its heartbeats for a few seconds.
    """
    import tensorflow as tf

    if not isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)):
        return None
    text = re.sub(r"\{\{[^}]*\}\}", "", str(exc))  # TensorFlow's {{function_node ...}} markers
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if "aborted" in line.lower() or "unhealthy" in line), lines[0] if lines else "")
    task = next((line for line in lines if line.startswith("/job:")), "")
    return PipelineError(f"the multi-worker training stopped: a worker stopped or cannot be reached "
                         f"(TensorFlow: {' '.join(filter(None, (reason, task)))[:300]}); start every worker again "
                         "(the chief resumes from its backup where every worker sees it)")
