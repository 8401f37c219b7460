"""The end of a run's collectives: nothing left for gloo's worker threads to free at interpreter exit.

Why this exists. Rank processes of multi-rank CPU (gloo) runs sometimes died with SIGABRT
("terminate called without an active exception", exit -6) after writing their results, with either
CPU tracker and without memprof too (docs/launcher.md "Rank aborts at exit" has a plain
torch.distributed reproducer). A core dump of such a rank shows the aborting thread:

    std::terminate <- __gxx_personality_v0 <- _Unwind_ForcedUnwind <- pthread_exit
      <- PyThread_exit_thread <- take_gil <- pybind11::gil_scoped_acquire
      <- ConcretePyInterpreterVTable::decref <- c10::TensorImpl::decref_pyobject
      <- ~AsyncAllreduceWork <- ~AsyncBarrierWork <- c10d::ProcessGroupGloo::runLoop

gloo runs each collective on a worker thread (ProcessGroupGloo::runLoop) and frees the finished
work object there, after the caller's wait() has already returned. A work that holds the last
reference to a tensor Python has dropped meanwhile (its PyObject then belongs to the tensor:
torch/csrc/autograd/python_variable.cpp THPVariable_tryResurrect) must take the GIL to free it. If
the main thread has begun interpreter shutdown by then, CPython 3.11's take_gil ends the thread with
pthread_exit, whose unwinding reaches a noexcept destructor: std::terminate. A busy machine widens
the window (the worker is descheduled between completing the work and freeing it).
``destroy_process_group()`` does not help: gloo's ``shutdown()``/``abort()`` leave the threads
running, which only ``~ProcessGroupGloo`` joins, and DeepSpeed keeps references to its groups.

The fix: the last collective of the run is a barrier whose work object is never freed. gloo's
barrier records (under the work queue's lock) every work in progress or queued when it is enqueued
(ProcessGroupGloo::barrier, ``priorWork``, as weak references), and a work's destructor runs only
when its last strong and weak reference are gone. So any work a worker thread is still holding,
and the barrier itself, is then freed only with the barrier, which is never: no worker thread
frees a tensor after this point. A work finished and freed before the barrier was freed while the
interpreter was fully alive. Memory kept: one barrier work and whatever works were in flight.
"""

from __future__ import annotations

import ctypes
from typing import Any

# the barrier works kept alive until the process ends (see the module docstring); the reference
# taken with Py_IncRef keeps them alive through interpreter shutdown too, when this list is cleared
_KEPT_TO_EXIT: list[Any] = []


def _uses_gloo() -> bool:
    import torch.distributed as dist

    return "gloo" in str(dist.get_backend()).lower()


def settle_gloo_workers() -> bool:
    """End the run's collectives with a barrier whose work is never freed (gloo only; a collective:
    every rank calls it). True when the barrier ran; False without a gloo process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not _uses_gloo():
        return False
    work = dist.barrier(async_op=True)
    work.wait()
    _KEPT_TO_EXIT.append(work)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(work))
    return True


def shutdown_distributed(*, destroy: bool) -> None:
    """The end of a run's use of torch.distributed, on every rank (a collective).

    ``destroy=True`` (memprof's own launcher, which owns the process group): a barrier, then
    ``destroy_process_group()``. ``destroy=False`` (an integration inside the user's script, whose
    process group it is): the barrier only. On gloo the barrier is :func:`settle_gloo_workers`'s;
    on other backends a plain barrier where the process group is destroyed, nothing otherwise.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if not settle_gloo_workers() and destroy:
        dist.barrier()
    if destroy:
        dist.destroy_process_group()
