"""Self-checks around a run: the observer effect, the environment, and dtype contracts.

- Observer effect: instrumentation must not change what it measures. Each model is run
  once with no hooks; its outputs and parameter gradients must be bitwise identical to the
  instrumented run's. The port's run without hooks goes on a copy of it, alongside the
  forced pass, where there is a core and memory to spare for it.
- Environment: what makes numbers differ between runs or machines (versions, threads,
  deterministic flags, TF32, seeds), recorded so two reports can be told apart.
- Dtypes: every parameter and buffer on both sides. A paired tensor whose dtype differs (a
  bf16 RoPE table where the reference keeps fp32) is a finding of its own.
"""

from __future__ import annotations

import copy
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from align.capture import Trace, flatten

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG",
               "FLAGS_cudnn_deterministic", "FLAGS_embedding_deterministic")


@dataclass(frozen=True)
class Finding:
    """Something wrong that is not a numeric mismatch of one module."""

    kind: str  # "dtype_mismatch", "observer_effect", "unpaired", ...
    name: str
    message: str
    fails: bool  # whether it fails the gate on its own

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Observer:
    framework: str
    outputs_identical: bool
    grads_identical: bool
    differing: tuple[str, ...]
    checked: bool = True  # False on the gate and layer-streamed paths, which skip the run without hooks
    # Worst parameter-gradient difference, in ulps of the model's largest gradient value.
    # Boundary identities add autograd nodes, which can reorder how torch sums a tensor's
    # gradient contributions: a rounding-level change, never a semantic one.
    grad_ulps: float = 0.0
    alongside: bool = False  # the run without hooks was made on a copy, alongside the instrumented ones

    @property
    def perturbed(self) -> bool:
        return self.checked and (not self.outputs_identical or self.grad_ulps > OBSERVER_ULPS)

    @property
    def state(self) -> str:
        if not self.checked:
            return "not checked (not run on this path)"
        if self.perturbed:
            return "DIFFERENT"
        if self.grads_identical:
            return "identical"
        return f"outputs identical, gradients within {self.grad_ulps:.1f} ulp (summation order)"

    def to_dict(self) -> dict:
        return {**asdict(self), "differing": list(self.differing), "perturbed": self.perturbed, "state": self.state}


OBSERVER_ULPS = 8.0  # allowance for summation order in the observer check's gradients


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return a.tobytes() == b.tobytes()
    bits = f"u{a.dtype.itemsize}"  # bitwise: -0.0 is not 0.0, and a NaN equals the same NaN
    return bool(np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits)))


@dataclass(frozen=True)
class Observed:
    """What a run without hooks gave: the model's outputs and its parameters' gradients."""

    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray | None]


def bare_run(fw: Any, model: Any, inputs: dict[str, Any], seed_fn: Callable) -> Observed:
    """Forward and backward with no hooks: the model's outputs and its parameters' gradients."""
    fw.clear_grads(model)
    output = model(**inputs)
    fw.backward(seed_fn(output))
    outputs = {p: fw.view(t) for p, t in flatten(output, fw) if fw.is_tensor(t)}
    grads = {k: fw.grad(p) for k, p in fw.parameters(model).items()}
    fw.clear_grads(model)
    return Observed(outputs, grads)


def observer_copy(fw: Any, model: Any, activations: int) -> Any | None:
    """A copy of the model for its run without hooks to go alongside the instrumented runs
    (see alongside), if there is room for one and the model can be copied; None otherwise,
    and the run without hooks comes after the others.

    Paddle's CPU kernels keep to one core and release the GIL while they work, so on a
    machine with a second core that run costs next to no wall time. The copy holds bitwise
    the same weights and runs the same single-threaded kernels: its outputs and gradients
    are those the original would give (tests/test_diagnosis.py checks both ways).
    `activations` is about what a run keeps for its backward (Trace.output_bytes): the copy
    needs its weights, their gradients, that, and as much again for what boundaries miss."""
    weights = sum(fw.nbytes(t) for t in (*fw.parameters(model).values(), *fw.buffers(model).values()))
    if not room_alongside(2 * weights + 2 * activations):
        return None
    fw.clear_grads(model)
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model deepcopy cannot copy is checked the other way
        return None


def alongside(background: Callable[[], Any], foreground: Callable[[], Any]) -> tuple[Any, Any]:
    """Both results: `background()` run in a thread of its own while `foreground()` runs in
    this one. The thread is always waited for; an error in either reaches the caller."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["result"] = background()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            done["error"] = e

    thread = threading.Thread(target=run, name="align-alongside")
    thread.start()
    try:
        ahead = foreground()
    finally:
        thread.join()
    if "error" in done:
        raise done["error"]
    return done["result"], ahead


def room_alongside(nbytes: int) -> bool:
    """Whether a second run that needs `nbytes` can go alongside the first: a core to run
    on, and at most half of the memory the system has available."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False  # unknown: the safe way is one run after another
    return cores >= 2 and nbytes < available / 2


def observer_check(fw: Any, model: Any, inputs: dict[str, Any], seed_fn: Callable, trace: Trace) -> Observer:
    """Run forward and backward with no hooks and compare bitwise with the recorded trace."""
    return judge_observed(fw.name, bare_run(fw, model, inputs, seed_fn), trace)


def judge_observed(framework: str, run: Observed, trace: Trace, alongside: bool = False) -> Observer:
    """A run without hooks against the instrumented run's trace: outputs bitwise, gradients
    bitwise or within OBSERVER_ULPS (summation order). `alongside`: that run was made on a
    copy, alongside the instrumented ones (see observer_copy)."""
    outputs, grads = run.outputs, run.grads
    out_diff = [k for k in set(outputs) | set(trace.outputs)
                if k not in outputs or k not in trace.outputs or not _same(outputs[k], trace.outputs[k].data)]
    grad_diff = [k for k in grads if not _same(grads[k], trace.param_grads.get(k))]
    # Summation-order rounding scales with the terms summed, not with the result (a key bias's
    # gradient is ~0 by softmax invariance, its rounding is not): ulps of the model's largest gradient.
    ulps = 0.0
    if grad_diff:
        scale = max((max(float(g.max()), -float(g.min())) for g in trace.param_grads.values() if g.size), default=0.0)
        ulps = max(_ulps(grads[k], trace.param_grads.get(k), scale) for k in grad_diff)
    return Observer(framework, not out_diff, not grad_diff, tuple(sorted(out_diff) + sorted(grad_diff)), grad_ulps=ulps,
                    alongside=alongside)


def _ulps(a: np.ndarray | None, b: np.ndarray | None, scale: float) -> float:
    """max|a - b| in ulps of `scale` (inf when only one exists, or the shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    unit = scale * float(np.finfo(b.dtype).eps if b.dtype.kind == "f" else 1.0)
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))
    return diff / unit if unit > 0 else (0.0 if diff == 0 else float("inf"))


def _platform() -> str:
    """platform.platform()'s answer ("Linux-6.1.0-x86_64-with-glibc2.36"), without the
    `uname -p` process it starts on Linux for a processor name it then leaves out."""
    system, _, release, _, machine = os.uname()
    try:
        libc = "".join(os.confstr("CS_GNU_LIBC_VERSION").split())  # "glibc 2.36" -> "glibc2.36"
    except (ValueError, OSError, AttributeError):
        libc = ""
    return "-".join(p for p in (system, release, machine) if p) + (f"-with-{libc}" if libc else "")


def _process() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": _platform(), "machine": platform.machine(),
            "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "env_vars": {k: os.environ.get(k) for k in THREAD_VARS}}


def reference_environment() -> dict[str, Any]:
    """The torch side: versions, threads and the flags that change fp32 results."""
    import torch
    import transformers

    return {
        "process": _process(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "determinism": {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            # TF32 rounds fp32 matmuls to 10 mantissa bits on Ampere+ GPUs: enough to break 1e-5.
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
    }


def port_environment() -> dict[str, Any]:
    """The Paddle side (never imports torch: it may run where torch is not installed)."""
    from align.paddle_side import paddle

    return {
        "process": _process(),
        "paddle": paddle.__version__,
        "paddle_commit": getattr(paddle.version, "commit", None),
        "device": paddle.device.get_device(),
        "compiled_with_cuda": paddle.is_compiled_with_cuda(),
    }


def environment(reference: dict[str, Any], port: dict[str, Any], seeds: dict[str, int]) -> dict[str, Any]:
    """Both sides' records, plus the headline versions a report shows first."""
    return {"torch": reference["torch"], "paddle": port["paddle"], "transformers": reference["transformers"],
            "same_environment": reference["process"] == port["process"],
            "reference": reference, "port": port, "seeds": seeds}


def environment_warnings(env: dict[str, Any]) -> list[str]:
    """Settings that make fp32 numbers drift on their own, said plainly."""
    warnings = []
    ref = env["reference"]
    d = ref["determinism"]
    if ref["device"] == "cuda":
        if d["tf32_matmul"] or d["tf32_cudnn"]:
            warnings.append("TF32 is enabled in torch: fp32 matmuls run with 10-bit mantissas on Ampere+ GPUs")
        if not d["deterministic_algorithms"]:
            warnings.append("torch deterministic algorithms are off on CUDA: repeated runs may differ")
    if env["reference"]["process"]["numpy"] != env["port"]["process"]["numpy"]:
        warnings.append(f"numpy differs between the reference ({ref['process']['numpy']}) and the port "
                        f"({env['port']['process']['numpy']}) processes")
    return warnings


def dtype_table(ref_dtypes: dict[str, str], port_dtypes: dict[str, str],
                to_port: Callable[[str], str | None]) -> tuple[dict[str, dict], list[Finding]]:
    """Every reference parameter and buffer with its dtype and its port counterpart's."""
    table, findings = {}, []
    for key, ref_dtype in ref_dtypes.items():
        port_key = to_port(key)
        port_dtype = port_dtypes.get(port_key) if port_key else None
        table[key] = {"reference": ref_dtype, "port_name": port_key, "port": port_dtype}
        if port_dtype is not None and port_dtype != ref_dtype:
            findings.append(Finding("dtype_mismatch", key,
                                    f"{key}: the reference keeps {ref_dtype}, the port's {port_key} is {port_dtype}",
                                    fails=True))
    return table, findings
