"""A ReferenceRun on disk: `align trace` writes it, `align check` reads it in another process.

Layout of a trace directory:
    manifest.json             what was run (model, config, fingerprint, versions) and, per
                              call, its structure with tensor references
    inputs.safetensors        the model inputs
    calls/00042.safetensors   one file per recorded module call: its inputs, its outputs, and
                              the gradients at both of its boundaries
    param_grads.safetensors   every parameter gradient
    weights.safetensors       the reference's state dict (what the port's weights come from)
    fp64/                     with a noise floor: the float64 run, the same layout, plus
                              truth.safetensors (its teacher-forced values, forced on the
                              calls its manifest's `forced` lists; on every call if null)

Everything is written into a temporary directory beside the destination, which is renamed
into place once the manifest (written last) is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from align.atomic import temp_beside
from align.capture.trace import Arr, Call, Opaque, Trace
from align.diagnose.observer import Observer
from align.errors import ConfigError
from align.weights.safetensors_io import contiguous, load_arrays, save_arrays

TRACE_VERSION = 2


class _Tensors:
    """Collects the arrays of one file and hands out references to them."""

    def __init__(self, prefix: str):
        self.prefix, self.arrays, self.n = prefix, {}, 0

    def add(self, arr: np.ndarray) -> str:
        key = f"{self.prefix}{self.n}"
        self.n += 1
        self.arrays[key] = contiguous(arr)
        return key

    def save(self, path: Path) -> None:
        save_arrays(self.arrays, path)


def _encode(obj: Any, t: _Tensors) -> Any:
    if isinstance(obj, Arr):
        return {"__arr__": t.add(obj.data), "dtype": obj.dtype, "requires_grad": obj.requires_grad}
    if isinstance(obj, Opaque):
        return {"__opaque__": obj.type_name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, t) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, t) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v, t) for k, v in obj.items()}
    return obj


def _decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if "__arr__" in obj:
            return Arr(arrays[obj["__arr__"]], obj["dtype"], obj["requires_grad"])
        if "__opaque__" in obj:
            return Opaque(obj["__opaque__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, arrays) for v in obj["__tuple__"])
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


class TraceWriter:
    """Writes a trace one module call at a time (each call's tensors can be dropped once it is
    written); the rest, then the manifest, at finish(). Everything goes into a
    temporary directory that finish() renames into place, so a failed run leaves nothing."""

    def __init__(self, dst: Path, force: bool = False):
        self.dst = Path(dst)
        if self.dst.exists() and not force:
            raise ConfigError(self.dst, "", "already exists (pass --force to replace it)")
        self.tmp = temp_beside(self.dst, directory=True)
        (self.tmp / "calls").mkdir()
        self.calls: list[dict] = []

    def add(self, name: str, call: Call) -> None:
        """Write one call: its recorded inputs, outputs and gradients."""
        t = _Tensors("t")
        entry = {
            "name": name, "module": call.module, "type": call.type, "start": call.start, "end": call.end,
            "arg_names": list(call.arg_names), "params": list(call.params), "args": _encode(call.args, t), "kwargs": _encode(call.kwargs, t),
            "outputs": _encode(dict(call.outputs), t), "grads": {p: t.add(g) for p, g in call.grads.items()},
            "input_grads": {p: t.add(g) for p, g in call.input_grads.items()},
            "file": f"calls/{len(self.calls):05d}.safetensors",
        }
        t.save(self.tmp / entry["file"])
        self.calls.append(entry)

    def finish(self, run: Any) -> Path:
        """Write the run-level tensors and the manifest, and move the trace into place."""
        inputs, grads = _Tensors("i"), _Tensors("g")
        manifest = {
            "trace_version": TRACE_VERSION,
            "model": run.model, "config_name": run.config_name, "config": run.config,
            "fingerprint": run.fingerprint, "checkpoint": run.checkpoint, "created": run.created,
            "only": list(run.only),
            "env": run.env, "dtypes": run.dtypes, "observer": run.observer.to_dict(),
            "inputs": _encode(dict(run.inputs), inputs),
            "outputs": _encode(dict(run.trace.outputs), inputs),
            "param_grads": {k: grads.add(g) for k, g in run.trace.param_grads.items()},
            "params_dtype": run.trace.params_dtype,
            "calls": self.calls,
            "fp64": run.fp64 is not None,
            "forced": None if run.forced is None else sorted(run.forced),
        }
        inputs.save(self.tmp / "inputs.safetensors")
        grads.save(self.tmp / "param_grads.safetensors")
        save_arrays({k: contiguous(v) for k, v in run.weights.items()}, self.tmp / "weights.safetensors")
        save_arrays({k: contiguous(v) for k, v in run.truth.items()}, self.tmp / "truth.safetensors")
        if run.fp64 is not None:
            write_trace(run.fp64, self.tmp / "fp64")
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, default=str) + "\n")
        if self.dst.exists():
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return self.dst

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_trace(run: Any, dst: Path, force: bool = False) -> Path:
    """Write a whole ReferenceRun held in memory to `dst` (a directory), whole or not at all."""
    with TraceWriter(dst, force) as writer:
        for name, call in run.trace.calls.items():
            writer.add(name, call)
        return writer.finish(run)


def read_trace(path: Path) -> Any:
    """Read a trace directory back into a ReferenceRun."""
    from align.core.reference import ReferenceRun

    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", "not a trace: no manifest.json (write one with `align trace MODEL --out DIR`)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(manifest_path, "", f"not valid JSON: {e}") from None
    if manifest.get("trace_version") != TRACE_VERSION:
        raise ConfigError(manifest_path, "trace_version",
                          f"version {manifest.get('trace_version')!r}; this align reads version {TRACE_VERSION}")
    try:
        calls = {}
        for c in manifest["calls"]:
            arrays = load_arrays(path / c["file"])
            call = Call(c["name"], c["module"], c["type"], c["start"], c["end"],
                        args=_decode(c["args"], arrays), kwargs=_decode(c["kwargs"], arrays),
                        arg_names=tuple(c["arg_names"]), params=tuple(c.get("params", ())), outputs=_decode(c["outputs"], arrays),
                        grads={p: arrays[k] for p, k in c["grads"].items()},
                        input_grads={p: arrays[k] for p, k in c["input_grads"].items()})
            calls[c["name"]] = call
        inputs = load_arrays(path / "inputs.safetensors")
        grads = load_arrays(path / "param_grads.safetensors")
        trace = Trace("torch", calls, {k: grads[v] for k, v in manifest["param_grads"].items()},
                      manifest["params_dtype"], _decode(manifest["outputs"], inputs))
        return ReferenceRun(
            model=manifest["model"], config_name=manifest["config_name"], config=manifest["config"],
            fingerprint=manifest["fingerprint"], inputs=_decode(manifest["inputs"], inputs), trace=trace,
            truth=load_arrays(path / "truth.safetensors"), weights=load_arrays(path / "weights.safetensors"), dtypes=manifest["dtypes"],
            observer=Observer(**{**{k: v for k, v in manifest["observer"].items() if k in Observer.__dataclass_fields__},
                                 "differing": tuple(manifest["observer"]["differing"])}),
            env=manifest["env"], checkpoint=manifest["checkpoint"], created=manifest["created"],
            fp64=read_trace(path / "fp64") if manifest.get("fp64") else None, only=tuple(manifest.get("only", ())),
            forced=None if manifest.get("forced") is None else frozenset(manifest["forced"]),
        )
    except ConfigError as e:  # one of its files, damaged or gone
        raise ConfigError(path, "", f"corrupt or incomplete trace: {e}") from None
    except (KeyError, OSError, ValueError) as e:
        raise ConfigError(path, "", f"corrupt or incomplete trace: {type(e).__name__}: {e}") from None


def check_matches(run: Any, spec: Any, fingerprint: str, config: str) -> None:
    """Refuse a trace made for another model, config, rules or input recipe."""
    where = Path(spec.source)
    if run.model != spec.name:
        raise ConfigError(where, f"models.{spec.name}", f"the trace was made for model {run.model!r}, not {spec.name!r}")
    if run.config_name != config:
        raise ConfigError(where, f"models.{spec.name}.configs.{config}",
                          f"the trace was made with config {run.config_name!r}, not {config!r}")
    if run.fingerprint != fingerprint:
        raise ConfigError(where, f"models.{spec.name}",
                          f"the trace ({run.fingerprint}) no longer matches this registry's config, rules, inputs "
                          f"or init ({fingerprint}); trace the reference again")
