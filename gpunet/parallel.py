"""Data-parallel training over MPI (mpi4py), with NCCL for the GPUs' all-reduce.

``mpiexec -n K gpunet train ...`` starts K processes; :func:`world` gives each a :class:`Comm` (None
in a plain run, and mpi4py is not even imported then). Every rank holds the whole model and reads
the whole data set; each global batch of the same seeded order is split across the ranks
(``shard``); each rank's gradients, weighted by its share of the batch, are summed by one all-reduce
of one flat buffer per step (:class:`GradientSum`), so that every rank applies the same update to
the same weights.

On the CPU the buffer goes through MPI; on GPUs (one per rank, chosen from the rank on its node)
through NCCL (``cupy.cuda.nccl``), its unique id sent through MPI. This module imports nothing of
gpunet but the backend.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import backend
from .backend import get_array_module

# how launchers tell a process its place: MPICH/Hydra (PMI), Open MPI, Slurm
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_LOCAL_RANK_VARS = (
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMIX_LOCAL_RANK",
    "SLURM_LOCALID",
)


class ParallelError(RuntimeError):
    """Distributed training cannot start or go on; the message names the cause. ``everywhere`` is
    True when every rank raises it at the same point (a collective check), so that no rank waits on
    another."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def launched_size() -> int:
    """How many processes the launcher started (1 outside mpiexec)."""
    for var in _SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher tells it (0 outside mpiexec)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def world():
    """The :class:`Comm` of this ``mpiexec`` job, or None for a single process."""
    if launched_size() <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ParallelError(
            f"started by mpiexec with {launched_size()} processes, but mpi4py is missing "
            f"({exc}); pip install 'gpunet[mpi]'"
        ) from exc
    return Comm(MPI)


class Comm:
    """The ranks of one job: ``rank``, ``size``, collective operations, and the GPU each rank
    uses."""

    def __init__(self, MPI):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = next(
            (int(os.environ[v]) for v in _LOCAL_RANK_VARS if os.environ.get(v, "").isdigit()),
            self.rank,
        )
        self._nccl = None

    def use_local_gpu(self) -> None:
        """One GPU per rank: rank i on its node takes device i (modulo the devices there), chosen
        before anything touches a GPU (no rank keeps a context on GPU 0); nothing when no GPU is
        usable."""
        backend.select_gpu(local_rank=self.local_rank)

    def allreduce(self, buf) -> None:
        """Sum ``buf`` (a contiguous NumPy or CuPy array) over the ranks, in place."""
        if get_array_module(buf) is np:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            return
        from cupy.cuda import nccl

        if self._nccl is None:  # one NCCL communicator, its id made by rank 0 and sent through MPI
            uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        import cupy

        kind = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}[buf.dtype.name]
        self._nccl.allReduce(
            buf.data.ptr,
            buf.data.ptr,
            buf.size,
            kind,
            nccl.NCCL_SUM,
            cupy.cuda.get_current_stream().ptr,
        )

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def same_everywhere(self, what: str, value) -> None:
        """Raise ParallelError on every rank unless ``value`` (JSON data) is equal on all of
        them."""
        text = json.dumps(value, sort_keys=True, default=str)
        values = self.allgather(text)
        for r, other in enumerate(values):
            if other != text:
                mine, theirs = json.loads(text), json.loads(other)
                keys = (
                    [k for k in mine if mine.get(k) != theirs.get(k)]
                    if isinstance(mine, dict)
                    else []
                )
                detail = (
                    " ("
                    + ", ".join(f"{k}: {mine[k]!r} here, {theirs.get(k)!r} there" for k in keys)
                    + ")"
                    if keys
                    else ""
                )
                # every rank gathered the same values, so every rank sees a difference and raises
                # here
                raise ParallelError(
                    f"{what} differs between rank {self.rank} and rank {r}{detail}; "
                    f"every rank must be started with the same settings",
                    everywhere=True,
                )

    def agree(self, device: str, dtype) -> None:
        """Before the first collective of a training run: one allgather of every rank's host, GPU,
        device, dtype and NCCL availability. Raises ParallelError on every rank (each checks the
        same gathered list) when two ranks share a GPU (NCCL refuses it), when they disagree (a CPU
        rank's MPI all-reduce would wait forever on the GPU ranks' NCCL one), or when the GPUs have
        no NCCL."""
        mine = {
            "host": self.MPI.Get_processor_name(),
            "device": device,
            "dtype": str(dtype),
            "gpu": backend.chosen_gpu() if device == "gpu" else None,
            "nccl": nccl_available() if device == "gpu" else None,
        }
        check_agreement(self.allgather(mine), self.rank)

    def abort(self, code: int) -> None:
        """End every rank now (after a rank's error, so that no other waits on a collective
        forever)."""
        self.comm.Abort(code)


def nccl_available() -> bool:
    """Whether CuPy's NCCL binding loads (``cupy.cuda.nccl.available``)."""
    try:
        from cupy.cuda import nccl
    except Exception:  # CuPy built without NCCL, or no CuPy: the GPU ranks cannot sum
        return False
    return bool(getattr(nccl, "available", False))


def check_agreement(ranks: list, rank: int) -> None:
    """Raise ParallelError (``everywhere``) unless the ranks' dicts from :meth:`Comm.agree` fit
    together."""
    seen = {}
    for r, info in enumerate(ranks):
        if info["gpu"] is None:
            continue
        where = (info["host"], info["gpu"])
        if where in seen:
            on_host = sum(1 for i in ranks if i["host"] == info["host"])
            raise ParallelError(
                f"ranks {seen[where]} and {r} both use GPU {info['gpu']} of {info['host']} "
                f"({on_host} ranks there, one GPU each is needed: NCCL refuses two ranks on "
                f"one GPU); start at most as many ranks per node as it has GPUs, or use "
                f"--device cpu",
                everywhere=True,
            )
        seen[where] = r
    mine = ranks[rank]
    for key, name in (
        ("device", "the device"),
        ("dtype", "the dtype"),
        ("nccl", "NCCL's availability"),
    ):
        other = next((r for r, i in enumerate(ranks) if i[key] != mine[key]), None)
        if other is not None:
            raise ParallelError(
                f"{name} differs between rank {rank} and rank {other} ({mine[key]!r} here, "
                f"{ranks[other][key]!r} there); every rank must train on the same kind of "
                f"device in the same dtype",
                everywhere=True,
            )
    if mine["device"] == "gpu" and not mine["nccl"]:
        raise ParallelError(
            "several GPU ranks need NCCL to sum their gradients, but CuPy's NCCL binding is "
            "not available (python -m cupyx.tools.install_library --library nccl --cuda 12.x, or a "
            "system NCCL); or use --device cpu",
            everywhere=True,
        )


def sum_over_ranks(comm: Comm, *values) -> list:
    """Each value (a number, a NumPy array of sums or counts, or None) summed over the ranks,
    through one float64 all-reduce: exact for integers below 2**53. Each comes back as it went in:
    its type, or its dtype and shape (None stays None)."""
    parts = [np.asarray(v if v is not None else [], dtype=np.float64).reshape(-1) for v in values]
    buf = np.concatenate(parts)
    comm.allreduce(buf)
    out, start = [], 0
    for v, part in zip(values, parts):
        total, start = buf[start : start + part.size], start + part.size
        if v is None:
            out.append(None)
        elif isinstance(v, np.ndarray):
            out.append(total.reshape(v.shape).astype(v.dtype))
        else:
            out.append(type(v)(total[0]))
    return out


def shard(lo: int, hi: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's rows of the batch [lo, hi): near-equal consecutive parts, in rank order."""
    n = hi - lo
    return lo + rank * n // size, lo + (rank + 1) * n // size


class GradientSum:
    """After each rank's backward pass: ``grad = sum over ranks of (rows_r / rows) * grad_r``, the
    global batch's mean gradient, through one all-reduce of one flat buffer that also carries a stop
    flag.

    Every parameter's ``grad`` is a view into that buffer (rebound here, and again if something
    replaces it), so the gradients are written straight into it and the sum lands in them: no copies
    either way. The stop flag's slot is written only when this rank asks to stop, and zeroed once
    the ranks have read a stop (when they all stop), so an ordinary step writes nothing to it.
    """

    def __init__(self, comm: Comm, params):
        self.comm, self.params = comm, list(params)
        xp, dtype = get_array_module(self.params[0].data), self.params[0].data.dtype
        self.flat = xp.zeros(sum(int(p.data.size) for p in self.params) + 1, dtype=dtype)
        self.views, start = [], 0
        for p in self.params:
            n = int(p.data.size)
            self.views.append(self.flat[start : start + n].reshape(p.data.shape))
            start += n
        self._bind()
        self._flags = _LateFlags(self.flat) if xp is not np else None

    def _bind(self) -> None:
        """Make every ``grad`` its view into the buffer again (a replaced one's values copied
        over)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                view[...] = p.grad
                p.grad = view

    def __call__(self, rows: int, batch_rows: int, stop: bool, scaled: bool = False) -> bool:
        """Sum the gradients in place; True when any rank asked to stop after this step. ``scaled``:
        the gradients are already this rank's share (divided by ``batch_rows``, not by ``rows``)."""
        self._bind()
        if not rows:  # no rows here this step (a last batch smaller than the ranks): nothing to add
            self.flat[:-1] = 0
        elif not scaled:
            self.flat[:-1] *= self.flat.dtype.type(rows / batch_rows)
        if stop:
            self.flat[-1] = 1
        self.comm.allreduce(self.flat)
        if (
            self._flags is not None
        ):  # on a GPU: the previous step's flag, read without waiting for this one
            return self._flags.swap()
        answer = bool(self.flat[-1] > 0)
        if answer:  # every rank stops here: the slot starts at zero again for any later steps
            self.flat[-1] = 0
        return answer


class _LateFlags:
    """The stop flag of a GPU all-reduce, read one step late: reading this step's flag at once would
    make the host wait for the all-reduce every step. Each step's flag is copied to pinned host
    memory asynchronously; ``swap()`` starts that copy and answers with the previous step's flag,
    whose copy has long finished. Every rank answers the same at the same step, so all still stop
    together (one step after the one the signal came in)."""

    def __init__(self, flat):
        import cupy

        self.flat, self.cupy = flat, cupy
        self.host = []
        for _ in range(2):  # two buffers: one being written by the GPU while the other is read
            memory = cupy.cuda.alloc_pinned_memory(flat.dtype.itemsize)
            self.host.append(np.frombuffer(memory, flat.dtype, 1))
        self.pending, self.turn = None, 0

    def swap(self) -> bool:
        answer = False
        if self.pending is not None:
            event, host = self.pending
            event.synchronize()
            answer = bool(host[0] > 0)
            if (
                answer
            ):  # every rank stops now: zero the slot (kept since), so that later steps read 0
                self.flat[-1:] = 0
        host, self.turn = self.host[self.turn], 1 - self.turn
        self.flat[-1:].get(out=host, blocking=False)
        event = self.cupy.cuda.Event()
        event.record()
        self.pending = (event, host)
        return answer
