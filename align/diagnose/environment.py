"""The environment of a run: what makes numbers differ between runs or machines (versions,
threads, deterministic flags, TF32, seeds), recorded so two reports can be told apart, and
what this machine cannot run (bf16 on CPU Paddle), said plainly."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG",
               "FLAGS_cudnn_deterministic", "FLAGS_embedding_deterministic")


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
    from align.capture.paddle_side import paddle

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


def bf16_unavailable() -> str:
    """Why bf16 is not run here, in words for the report."""
    from align.capture.paddle_side import paddle

    try:
        a = paddle.ones([2, 2], dtype="bfloat16")
        paddle.matmul(a, a)
    except Exception as e:  # paddle raises its own NotFoundError family
        first = str(e).strip().splitlines()[0][:200]
        return f"Paddle {paddle.__version__} on {paddle.device.get_device()} has no bfloat16 kernels: {first}"
    # Honest until the bf16 comparison exists: never a silent pass on a capable backend either.
    return (f"Paddle {paddle.__version__} on {paddle.device.get_device()} has bfloat16 kernels, "
            "but this version of align does not yet run the bf16 comparison")
