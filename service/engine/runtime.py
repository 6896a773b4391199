"""onnxruntime sessions of one model version and the choice of execution providers.

One :class:`ModelRuntime` per loaded version holds an ``InferenceSession`` per graph of the
artifact contract (``predict`` and ``score``, see ``models/README.md``). Sessions are created with
the providers picked by :func:`choose_device` from ``NEXTWORD_DEVICE``:

* ``cpu``: the CPU provider only.
* ``cuda``: CUDA first (CPU still listed, for the odd node CUDA lacks). onnxruntime-gpu, a driver
  and a session that really got the CUDA provider are all required, else start-up fails with
  :class:`DeviceUnavailableError`: a silent CPU fallback would hide a misconfigured GPU node.
* ``auto``: CUDA when usable, else CPU, saying so in the log and in ``/v1/models``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nextword import artifact as A
from service.engine.errors import DeviceUnavailableError, ModelLoadError

log = logging.getLogger("service.engine.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GRAPHS = ("predict", "score")
# A run over this many tokens (batch x time) or more returns its memory when done. onnxruntime's
# arena keeps what the largest run needed for the life of the session: one full batch of 512-word
# contexts (64 x 513 tokens) left the process 370 MB larger for good; shrunk after the run, 60 MB.
# Ordinary batches (64 prompts of 5-20 words: ~1,300 tokens) stay below it and pay nothing.
SHRINK_ARENA_TOKENS = 4096
LONG_SEQUENCE_TOKENS = 128  # a batch this long (time steps, under SHRINK_ARENA_TOKENS in all) alone spins


def _libc_malloc_trim() -> object | None:
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# What the arena gives back after a large run is freed to glibc, which may keep it: chunks under
# its (growing) mmap threshold live in the worker thread's heap, and whether they reach the OS
# depends on what else sits there. One full KServe batch of the longest texts, a long generation
# and a session from the longest text then left the process 280 MB larger now and then instead of
# never. ``malloc_trim(0)`` returns every free page of every heap (a few ms, after runs that took
# far longer).
_MALLOC_TRIM = _libc_malloc_trim()


@dataclass(frozen=True)
class DeviceChoice:
    """Providers to create sessions with, and why."""

    requested: str
    providers: tuple[str, ...]
    note: str | None = None

    @property
    def wants_cuda(self) -> bool:
        return CUDA in self.providers


def _cuda_driver_present() -> bool:
    """onnxruntime-gpu lists the CUDA provider even on machines without a GPU; the driver
    library is the cheap tell (on Linux; elsewhere trust onnxruntime)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_device(device: str) -> DeviceChoice:
    """Providers for ``NEXTWORD_DEVICE``; raises :class:`DeviceUnavailableError` for an unusable ``cuda``."""
    available = ort.get_available_providers()
    cuda_ok = CUDA in available and _cuda_driver_present()
    if device == "cpu":
        return DeviceChoice("cpu", (CPU,))
    if device == "cuda":
        if CUDA not in available:
            raise DeviceUnavailableError(
                "NEXTWORD_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime"
            )
        if not cuda_ok:
            raise DeviceUnavailableError("NEXTWORD_DEVICE=cuda but no CUDA driver/GPU is present on this machine")
        return DeviceChoice("cuda", (CUDA, CPU))
    if device != "auto":
        raise DeviceUnavailableError(f"unknown device {device!r}; use auto, cpu or cuda")
    if cuda_ok:
        return DeviceChoice("auto", (CUDA, CPU))
    reason = "onnxruntime has no CUDAExecutionProvider" if CUDA not in available else "no CUDA driver/GPU found"
    return DeviceChoice("auto", (CPU,), note=f"device auto: {reason}, running on CPU")


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class GraphIO:
    inputs: dict[str, list]
    outputs: dict[str, list]


@dataclass
class ModelRuntime:
    """The onnxruntime sessions of one model version. ``run`` is thread-safe (onnxruntime's
    ``InferenceSession.run`` is), though the batcher calls it from a single worker thread."""

    card: A.ModelCard
    sessions: dict[str, ort.InferenceSession]
    device: str  # "cpu" or "cuda": what the sessions really got
    device_note: str | None = None
    io: dict[str, GraphIO] = field(default_factory=dict)
    # Sessions with a narrower intra-op pool, for batches that run while another worker's batch
    # runs too: two full-width pools on one CPU contend (measured on 2 cores: 1.74 instead of
    # 1.37 ms of CPU per row at batch 30, fewer rows/s than one thread).
    shared_sessions: dict[str, ort.InferenceSession] | None = None
    # A predict session whose idle intra-op threads spin, for a long sequence running alone: its
    # recurrent steps are hundreds of tiny parallel sections, and waking sleeping threads for each
    # cost a 512-word prompt 59.5 instead of 20.3 ms (2 threads). Short steps and concurrent
    # batches keep the sleeping pool, so the spinning does not take the event loop's CPU.
    long_sessions: dict[str, ort.InferenceSession] | None = None

    @classmethod
    def load(
        cls, directory: str | Path, card: A.ModelCard, choice: DeviceChoice, intra_op_threads: int = 0,
        spinning: bool = False, workers: int = 1, spinning_long: bool = True,
    ) -> ModelRuntime:
        """Sessions for every graph. With ``workers`` > 1 on CPU, also a second predict session
        whose intra-op pool is the cores divided among the workers (see :meth:`run`)."""
        directory = Path(directory)

        def create(
            threads: int, graphs: tuple[str, ...] = GRAPHS, spin: bool = spinning
        ) -> dict[str, ort.InferenceSession]:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            # One batch at a time per session call: a parallel inter-op pool would only add threads.
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.log_severity_level = 3
            out: dict[str, ort.InferenceSession] = {}
            for graph in graphs:
                file = card.graphs.get(graph)
                if file is None:
                    raise ModelLoadError(f"model.json names no {graph!r} graph")
                try:
                    out[graph] = ort.InferenceSession(str(directory / file), opts, providers=list(choice.providers))
                except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
                    raise ModelLoadError(f"onnxruntime cannot load {file}: {exc}") from exc
            return out

        sessions = create(intra_op_threads)
        got = {p for s in sessions.values() for p in s.get_providers()}
        device = "cuda" if CUDA in got else "cpu"
        note = choice.note
        if choice.wants_cuda and device != "cuda":
            if choice.requested == "cuda":
                raise DeviceUnavailableError("NEXTWORD_DEVICE=cuda but onnxruntime could not create a CUDA session")
            note = "device auto: CUDA session creation failed, running on CPU"
        runtime = cls(card=card, sessions=sessions, device=device, device_note=note)
        full = intra_op_threads or _usable_cpus()
        shared = max(1, full // workers)
        if device == "cpu" and workers > 1 and shared < full:
            # Only the predict graph (predictions, sessions, generation) is hot enough to need
            # them; each set holds its own float32 copy of the weights.
            runtime.shared_sessions = create(shared, ("predict",))
        if device == "cpu" and spinning_long and not spinning and full > 1:
            runtime.long_sessions = create(intra_op_threads, ("predict",), spin=True)
        runtime.io = {
            g: GraphIO(
                inputs={i.name: list(i.shape) for i in s.get_inputs()},
                outputs={o.name: list(o.shape) for o in s.get_outputs()},
            )
            for g, s in sessions.items()
        }
        runtime.check_signature()
        return runtime

    def check_signature(self) -> None:
        """The graphs take and give exactly the tensors the card promises (names and fixed dims),
        so a mismatched card/graph pair fails at load time, not on the first request."""
        card = self.card
        states_in = {A.state_input(s) for s in card.state_names}
        states_out = {A.state_output(s) for s in card.state_names}
        expected = {
            "predict": ({A.TOKENS, A.LENGTHS, *states_in}, {A.LOG_PROBS, *states_out}),
            "score": ({A.TOKENS, A.LENGTHS, A.TARGETS, *states_in}, {A.TARGET_LOG_PROBS, A.TARGET_RANKS, *states_out}),
        }
        for graph, (ins, outs) in expected.items():
            io = self.io[graph]
            if set(io.inputs) != ins or not outs <= set(io.outputs):
                raise ModelLoadError(
                    f"{graph} graph has inputs {sorted(io.inputs)} and outputs {sorted(io.outputs)}; "
                    f"the card implies inputs {sorted(ins)} and outputs {sorted(outs)}"
                )
            for name in states_in:
                shape = io.inputs[name]
                if shape[0] != card.num_layers or shape[2] != card.hidden_size:
                    raise ModelLoadError(
                        f"{graph} graph {name} is {shape}, card says [{card.num_layers}, batch, {card.hidden_size}]"
                    )
        vocab_dim = self.io["predict"].outputs[A.LOG_PROBS][1]
        if isinstance(vocab_dim, int) and vocab_dim != card.vocab_size:
            raise ModelLoadError(
                f"predict graph has {vocab_dim} outputs per row, card says vocab_size={card.vocab_size}"
            )

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        shape = (self.card.num_layers, batch, self.card.hidden_size)
        return {name: np.zeros(shape, np.float32) for name in self.card.state_names}

    def run(
        self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str], shared: bool = False
    ) -> tuple[list[np.ndarray], float]:
        """Run one graph; returns the requested outputs and the wall time of ``run``. ``shared``:
        other batches are running or waiting, so use the narrower sessions when there are some."""
        session = self.sessions[graph]
        tokens = feeds.get(A.TOKENS)
        if shared and self.shared_sessions is not None:
            session = self.shared_sessions.get(graph, session)
        elif (self.long_sessions is not None and tokens is not None
              and tokens.shape[-1] >= LONG_SEQUENCE_TOKENS and tokens.size < SHRINK_ARENA_TOKENS):
            # A big batch spreads each step's wake-ups over its rows, and its arena is shrunk
            # after the run: it stays on the ordinary session.
            session = self.long_sessions.get(graph, session)
        options = self._shrink_options() if tokens is not None and tokens.size >= SHRINK_ARENA_TOKENS else None
        start = time.perf_counter()
        result = session.run(outputs, feeds, options)
        elapsed = time.perf_counter() - start
        if options is not None and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        return result, elapsed

    def _shrink_options(self) -> ort.RunOptions:
        options = ort.RunOptions()
        arenas = "cpu:0;gpu:0" if self.device == "cuda" else "cpu:0"
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        return options
