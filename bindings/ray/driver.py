"""The driver of a Ray build: `build` (one database, this process its one writer) and
`build_shards` (one package per worker), the actor pool, and the checks made before it starts.
The model's forward pass over every reference, the expensive part of a build, runs in a pool of
Ray actors; the database's single writer commits what they send back. docs/distributed.md tells
how to run it on a cluster.

    from m3db.bindings.ray import build, build_shards
    build("kb.m3db", documents, workers=4)                   # one database, one writer
    build_shards("shards/", documents, shards=8)             # eight packages, served together

`documents`: what `add_documents` takes (dicts with `text` and optional `source`, `title`,
`uri`, `metadata`, or strings; a list or any iterable) or a `ray.data.Dataset` with those
columns. Documents go in batches of `batch_size` consecutive documents, the unit add_documents
commits; a worker encodes a batch as the local build does, so the records are the local build's
bit for bit (worker.py says why the batches matter). A rerun skips committed documents.

Sharded: each shard (a contiguous run of batches) is encoded and written by its own worker into
its own package (`part-NNN.m3kb`); `m3db.connect([...parts])` serves them as one knowledge base
and `m3db merge` (m3db.package.merge) makes one database of them, equal to a local build.
Imports: ray, the engine's public names (`m3db`, `m3db.errors`, `m3db.extend`), this package's
models.py, worker.py and writer.py.
"""

import contextlib
import dataclasses
import functools
import os
import shutil

import m3db
from m3db.errors import DependencyError, InvalidInputError
from m3db.extend import holds_catalog, progress_bar

from .models import BundledModels, spec_of
from .worker import BatchEncoder, pack_batch, pack_failure, unpack
from .writer import BuildReport, commit_batch

try:
    import ray
except ImportError as e:  # the binding's module imports; its verbs say what to install
    ray, _RAY_ERROR = None, e

__all__ = ["BuildReport", "ShardReport", "build", "build_shards"]
# the CPUs the workers leave free for Ray Data's read tasks (a task asks for one CPU by default):
# actors that claim every CPU starve them and the pipeline stalls (seen with 2 actors x 1 CPU,
# and with 2 x 0.75, on 2 CPUs)
READ_RESERVE_CPUS = 1.0
SPEC_CPUS = 0.25  # the task that loads the model once to read its memory spec


@dataclasses.dataclass
class ShardReport(BuildReport):
    """A sharded build: BuildReport's counts over every shard, and the package paths, in order."""

    packages: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)  # packages found complete and not rebuilt


class _Worker:
    """A Ray Data actor: one BatchEncoder, its model loaded once."""

    def __init__(self, models, spec, committed, threads):
        if isinstance(committed, ray.ObjectRef):
            committed = ray.get(committed)
        # Ray reports an error raised here as "the actor died", without the error; sent as each
        # batch's result instead, the writer raises it as what it is (a model that does not load
        # on this node, a trained codec)
        self.failure = None
        try:
            self.encoder = BatchEncoder(models, spec, committed=committed, threads=threads)
        except Exception as e:  # noqa: BLE001 (carried to the writer, which raises it)
            self.failure = pack_failure(e)

    def __call__(self, batch):
        import numpy as np

        if self.failure is not None:  # as data: Ray Data also drops the error of a failed call
            return {"result": np.array([self.failure] * len(batch["batch"]), dtype=object)}

        out = np.empty(len(batch["batch"]), dtype=object)
        for i, blob in enumerate(batch["batch"]):
            out[i] = self.encoder.encode_batch(bytes(blob))
        return {"result": out}


def _raising_causes(verb):
    """An error raised in a Ray task reaches the caller as itself (FileNotFoundError: no model at
    ...), not wrapped in Ray's RayTaskError, whose message is the remote traceback."""

    @functools.wraps(verb)
    def wrapped(*args, **kwargs):
        try:
            return verb(*args, **kwargs)
        except Exception as e:
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
                if not isinstance(cause, ray.exceptions.RayError):
                    raise cause from None
            raise

    return wrapped


@_raising_causes
def build(
    path,
    documents,
    *,
    models=None,
    workers=2,
    cpus_per_worker=None,
    gpus_per_worker=0,
    batch_size=16,
    codec="int4",
    memory_mode=None,
    threads=None,
    address=None,
    progress=True,
) -> BuildReport:
    """Build (or extend) the database at `path` from `documents` with a pool of `workers` Ray
    actors; this process is the one writer. Returns a BuildReport; a bad document is in its
    `errors` (input position, source, the problem) and the rest of its batch is committed.

    models: what each worker loads (default: the bundled model, `memory_mode`); models.py's
    BundledModels, TransformersModels(path) or TinyModels, or your own picklable callable
    returning (model, embedder). cpus_per_worker: Ray's CPU reservation per actor (default: what
    leaves READ_RESERVE_CPUS free); gpus_per_worker: GPUs per actor. threads: torch threads per
    worker (default: this process's torch threads, as the local build uses). address: a running
    cluster (`ray start --head` prints it); default: the cluster already initialised, else a
    local one. codec, memory_mode: as for connect(), for a new database.
    """
    _check_counts(workers=workers, batch_size=batch_size)
    _init(address)
    options = _actor_options(workers, cpus_per_worker, gpus_per_worker)
    models = models or BundledModels(memory_mode)
    path = os.fspath(path)
    if holds_catalog(os.path.abspath(path)):
        db = m3db.connect(path)
        try:  # the workers' model must be the database's: say so before the pool starts
            db.spec.require_same(
                _remote_spec(models, db.spec.codec, gpus_per_worker), this=f"the database {path!r}", that="the model"
            )
        except BaseException:
            db.close()
            raise
    else:
        db = m3db.connect(path, spec=_remote_spec(models, codec, gpus_per_worker))
    report = BuildReport()
    try:
        committed = {row[0] for row in db.sql("SELECT source FROM documents")}
        with _data_context():
            batches = _batches(documents, batch_size)
            encoded = batches.map_batches(
                _Worker,
                fn_constructor_kwargs=dict(
                    models=models, spec=db.spec.to_dict(), committed=committed, threads=_threads(threads)
                ),
                batch_size=1,
                batch_format="numpy",
                **options,
            )
            total = _known_length(documents)
            first = 0
            with progress_bar(progress, "documents", total=total) as bar:
                for row in encoded.iter_rows():
                    n = commit_batch(db, row["result"], report, first=first)
                    first += n
                    bar.update(n)
                    bar.set_postfix(memories=report.memories_added, refresh=False)
    finally:
        db.close()
    return report


@_raising_causes
def build_shards(
    folder,
    documents,
    *,
    shards,
    models=None,
    cpus_per_worker=None,
    gpus_per_worker=0,
    batch_size=16,
    codec="int4",
    memory_mode=None,
    threads=None,
    address=None,
    progress=True,
) -> ShardReport:
    """Build `shards` packages in `folder` (`part-000.m3kb`, ...): shard k holds the k-th of
    `shards` contiguous runs of batches, encoded and written by its own worker into a database
    on that worker, then packed. The folder must be one every worker can write (on one machine
    it is; on a cluster, a shared file system). A package already there is complete (pack
    renames it into place) and is kept, so a rerun redoes only the missing shards.
    Other arguments as for build(). Returns a ShardReport."""
    _check_counts(shards=shards, batch_size=batch_size)
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InvalidInputError(f"{folder!r} is a file; --shards writes packages into a folder: name a folder")
    if holds_catalog(os.path.abspath(folder)):
        raise InvalidInputError(f"{folder!r} is a database; --shards writes packages into a folder: name another")
    _init(address)
    options = _actor_options(shards, cpus_per_worker, gpus_per_worker)
    models = models or BundledModels(memory_mode)
    with _data_context():
        packed = [bytes(r["batch"]) for r in _batches(documents, batch_size).iter_rows()]
    os.makedirs(folder, exist_ok=True)
    spec = _remote_spec(models, codec, gpus_per_worker).to_dict()
    task = ray.remote(_write_shard).options(
        num_cpus=options["num_cpus"], num_gpus=options.get("num_gpus", 0), max_retries=3
    )
    report = ShardReport()
    pending, name = {}, os.path.basename(os.path.normpath(os.path.abspath(folder)))
    first = 0
    for k in range(shards):
        part = packed[k * len(packed) // shards : (k + 1) * len(packed) // shards]
        out = os.path.join(folder, f"part-{k:03d}.m3kb")
        report.packages.append(out)
        count = sum(len(unpack(b)["docs"]) for b in part)
        if os.path.exists(out):
            report.kept.append(out)
        else:
            ref = task.remote(models, spec, ray.put(part), first, out, f"{name}-part-{k:03d}", _threads(threads))
            pending[ref] = count
        first += count
    with progress_bar(progress, "documents", total=sum(pending.values()), desc="shards") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                report.merge(BuildReport(**ray.get(ref)))
                bar.update(pending.pop(ref))
    return report


def _write_shard(models, spec, batches, first, out, name, threads) -> dict:
    """One shard, on its worker: encode every batch, commit each to a scratch database beside
    `out`, pack it to `out` (written to a temporary name and renamed), remove the scratch. A
    retry after a killed worker starts the scratch afresh, so the package is the same."""
    if isinstance(batches, ray.ObjectRef):
        batches = ray.get(batches)
    scratch = out[: -len(".m3kb")] + ".building"
    shutil.rmtree(scratch, ignore_errors=True)
    encoder = BatchEncoder(models, spec, threads=threads)
    report = BuildReport()
    with m3db.connect(os.path.join(scratch, "kb.m3db"), spec=spec) as db:
        for blob in batches:
            first += commit_batch(db, encoder.encode_batch(blob), report, first=first)
        db.pack(out, name=name, overwrite=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.asdict(report)


# -- helpers ------------------------------------------------------------------------------------


def _init(address):
    if ray is None:
        raise DependencyError(f"the Ray build needs the ray extra ({_RAY_ERROR}): pip install 'm3db[ray]'")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    elif address is not None and address not in ("auto", ray.get_runtime_context().gcs_address):
        raise InvalidInputError(
            f"Ray is already connected to {ray.get_runtime_context().gcs_address}, not {address}; "
            "pass no address, or call ray.shutdown() first"
        )


def _check_counts(**counts):
    for name, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {n!r}")


def _remote_spec(models, codec, gpus):
    """A new database's spec, from the models loaded once on a worker (the driver needs no model)."""
    task = ray.remote(spec_of).options(num_cpus=SPEC_CPUS, num_gpus=gpus)
    return m3db.MemorySpec.from_dict(ray.get(task.remote(models, codec)))


def _actor_options(workers, cpus, gpus) -> dict:
    if cpus is None:  # leave room for Ray Data's read tasks (see READ_RESERVE_CPUS)
        total = ray.cluster_resources().get("CPU", 1)
        cpus = max(0.05, min(1.0, round((total - READ_RESERVE_CPUS) / workers, 2)))
    if not (isinstance(cpus, (int, float)) and cpus > 0) or not (isinstance(gpus, (int, float)) and gpus >= 0):
        raise InvalidInputError(f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {cpus!r} and {gpus!r}")
    for need in (cpus, SPEC_CPUS):
        _check_fits(need, gpus)
    options = {"compute": ray.data.ActorPoolStrategy(size=workers), "num_cpus": cpus}
    if gpus:
        options["num_gpus"] = gpus
    return options


def _check_fits(cpus, gpus):
    """Refuse at once a worker that no node of the cluster can hold: Ray would wait for one forever
    (an autoscaling cluster would add the node: start it before the build)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = "; ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in nodes) or "no live nodes"
    raise InvalidInputError(
        f"no node of the Ray cluster can hold a worker of {cpus:g} CPUs and {gpus:g} GPUs (its nodes have: {have}), "
        "so Ray would wait for one forever: lower cpus_per_worker / gpus_per_worker (--cpus-per-worker, "
        "--gpus-per-worker), or add a node that has them (`ray start --address ADDR --num-gpus N`)"
    )


def _threads(threads):
    """torch's threads for each worker: the local build's unless given (Ray sets a worker's
    OMP_NUM_THREADS to its CPU reservation, and another thread count may round differently)."""
    if threads is not None:
        _check_counts(threads=threads)
        return threads
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


@contextlib.contextmanager
def _data_context():
    """Ray Data in input order (the writer commits batches in order, so ids follow the input)
    and without its own progress bars (the build draws one)."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _batches(documents, batch_size):
    """A Dataset of packed batches (column `batch`), in input order."""
    if isinstance(documents, ray.data.Dataset):
        # the Dataset's own reads and transforms run on the cluster; its rows come to the driver
        # in order, cut into exactly batch_size rows: the batches a local build of them makes
        # (repartition(strict=True) was tried and cut blocks differently from run to run)
        packed, first = [], 0
        for table in documents.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            rows = table.to_pylist()
            packed.append({"batch": pack_batch(rows, first)})
            first += len(rows)
        return ray.data.from_items(packed)
    if isinstance(documents, (str, bytes, dict)):
        raise InvalidInputError(
            f"documents must be a list or iterable of documents or a ray.data.Dataset, got {type(documents).__name__}"
        )
    packed, batch, first = [], [], 0
    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_size:
            packed.append({"batch": pack_batch(batch, first)})
            first, batch = first + len(batch), []
    if batch:
        packed.append({"batch": pack_batch(batch, first)})
    return ray.data.from_items(packed)


def _known_length(documents):
    """len(documents) for a list; None for a generator or a Dataset (counting would run it)."""
    if isinstance(documents, ray.data.Dataset):
        return None
    try:
        return len(documents)
    except TypeError:
        return None
