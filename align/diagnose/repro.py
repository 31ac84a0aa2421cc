"""A standalone reproduction of the first culprit, for whoever fixes the port.

`reports/<model>/repro/` holds the culprit's recorded reference inputs, outputs and gradients
(tensors.safetensors), both sides' weights for that module (weights_ref / weights_port),
a manifest, and repro.py, which rebuilds only that Paddle module, runs it on the saved
inputs (forward, and backward seeded with the reference's output gradients) and prints
the diff. repro.py needs paddle, numpy and safetensors, and neither torch nor align.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from align.capture.trace import ROOT, Arr, Call, Opaque, Trace
from align.registry.spec import ModelSpec, Tolerance
from align.weights.safetensors_io import contiguous, save_arrays


@dataclass
class Local:
    """What one module computes alone on the reference's recorded inputs."""

    outputs: dict[str, Arr] = field(default_factory=dict)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)  # keyed by the module's own names

    @classmethod
    def of(cls, trace: Trace, pair: Any) -> Local:
        """What the reference module computes alone on its recorded inputs, read off its run:
        its outputs, the gradients it sent back to its inputs, and its own parameters'
        gradients (for a module called more than once, or whose parameters are shared, their total)."""
        call = trace.calls[pair.ref]
        prefix = "" if pair.ref_module == ROOT else pair.ref_module + "."
        own = {k[len(prefix):]: g for k, g in trace.param_grads.items()
               if k.startswith(prefix) and "." not in k[len(prefix):]}
        return cls(outputs=dict(call.outputs), input_grads=dict(call.input_grads), param_grads=own)


@dataclass
class ReproCase:
    name: str  # the culprit's reference call name
    port_module: str
    call: Call
    tensors: dict[str, np.ndarray]  # input/, ref_output/, output_grad/, ref_input_grad/, ref_param_grad/
    inputs: dict[str, Any]  # {"args": [...], "kwargs": {...}} with tensor leaves as references into `tensors`
    ref_weights: dict[str, np.ndarray]
    port_weights: dict[str, np.ndarray]
    manifest: dict[str, Any]

    @classmethod
    def of(cls, spec: ModelSpec, config: dict[str, Any], pair: Any, trace: Trace, weights: dict[str, np.ndarray],
           ps: Any, port: Any, tol: Tolerance, wmap: Any) -> ReproCase:
        """For the culprit `pair`, from the reference's run (its Trace and state dict) and the port."""
        prefix = "" if pair.ref_module == ROOT else pair.ref_module + "."
        module_weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        return cls.make(spec, config, pair, trace.calls[pair.ref], Local.of(trace, pair), module_weights, ps, port,
                        tol, wmap)

    @classmethod
    def make(cls, spec: ModelSpec, config: dict[str, Any], pair: Any, call: Call, ref_local: Any,
             ref_weights: dict[str, np.ndarray], ps: Any, port: Any, tol: Tolerance, wmap: Any) -> ReproCase:
        """From the reference's record of the culprit (its call, its own replay, its weights)
        and the port's module."""
        port_layer = ps.submodule(port, pair.port_module)
        tensors: dict[str, np.ndarray] = {}
        accepted = ps.accepted_kwargs(port_layer)

        def encode(obj: Any, path: str) -> Any:
            if isinstance(obj, Arr):
                tensors[f"input/{path}"] = contiguous(obj.data)
                return {"__tensor__": f"input/{path}", "dtype": obj.dtype, "path": path}
            if isinstance(obj, Opaque):
                return None
            if isinstance(obj, dict):
                return {k: encode(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            if isinstance(obj, (tuple, list)):
                items = [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
                return items if isinstance(obj, list) else {"__tuple__": items}
            return obj

        inputs = {
            "args": [encode(a, call.arg_path(i)) for i, a in enumerate(call.args)],
            "kwargs": encode({k: v for k, v in call.kwargs.items() if accepted is None or k in accepted}, ""),
        }
        for path, a in call.outputs.items():
            tensors[f"ref_output/{path}"] = contiguous(a.data)
        for path, g in call.grads.items():
            tensors[f"output_grad/{path}"] = contiguous(g)
        for path, g in ref_local.input_grads.items():
            tensors[f"ref_input_grad/{path}"] = contiguous(g)
        # Reference parameter grads, renamed and laid out as the port's parameters.
        for attr, g in ref_local.param_grads.items():
            key = attr if pair.ref_module == ROOT else f"{pair.ref_module}.{attr}"
            entry = next((e for e in wmap.entries if key in e.sources and e.transform in ("copy", "transpose", "tied")), None)
            if entry is None:
                continue
            port_attr = entry.target if pair.port_module == ROOT else entry.target[len(pair.port_module) + 1:]
            tensors[f"ref_param_grad/{port_attr}"] = contiguous(g.T if entry.transposed else g)

        manifest = {
            "culprit": call.name,
            "module_type": call.type,
            "port_module": pair.port_module,
            "port_class": spec.port_class,
            "port_config_class": spec.port_config_class,
            "config": json.loads(json.dumps(config, default=str)),
            "reference_class": spec.reference_class,
            "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
            "project_root": str(spec.root),
            "inputs": inputs,
        }
        return cls(
            name=call.name, port_module=pair.port_module, call=call, tensors=tensors, inputs=inputs,
            ref_weights={k: contiguous(v) for k, v in ref_weights.items()},
            port_weights={k: contiguous(ps.record(v).data) for k, v in port_layer.state_dict().items()},
            manifest=manifest,
        )

    def write(self, out_dir: Path) -> Path:
        """Write the repro folder (whole or not at all) and return its path."""
        from align.atomic import write_folder

        def fill(tmp: Path) -> None:
            save_arrays(self.tensors, tmp / "tensors.safetensors")
            save_arrays(self.ref_weights, tmp / "weights_ref.safetensors")
            save_arrays(self.port_weights, tmp / "weights_port.safetensors")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
            (tmp / "repro.py").write_text(SCRIPT)

        return write_folder(out_dir, fill)


SCRIPT = '''"""Standalone reproduction written by align: one Paddle module against the reference's tensors.

    python repro.py          # exit 1 if the mismatch reproduces, 0 if the module now matches

Needs paddle, numpy and safetensors (not torch). The module is built from the port's own
config under paddle.LazyGuard, so only its own weights are ever materialized.
"""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import paddle
from safetensors import safe_open

HERE = Path(__file__).resolve().parent


def load_file(path):
    """The tensors of a safetensors file; those stored as (..., 2) real pairs made complex again."""
    with safe_open(path, framework="numpy") as f:
        pairs = set(json.loads((f.metadata() or {}).get("align.complex", "[]")))
        out = {}
        for k in f.keys():
            a = f.get_tensor(k)
            out[k] = np.ascontiguousarray(a).view(np.complex64 if a.dtype == np.float32 else np.complex128)[..., 0] \
                if k in pairs else a
        return out


def flatten(obj, prefix=""):
    join = (lambda k: f"{prefix}.{k}") if prefix else str
    if isinstance(obj, paddle.Tensor):
        return [(prefix or "out", obj)]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in flatten(v, join(k))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [p for f in dataclasses.fields(obj) for p in flatten(getattr(obj, f.name), join(f.name))]
    if isinstance(obj, (tuple, list)):
        return [p for i, v in enumerate(obj) for p in flatten(v, join(i))]
    return []


def build(spec, tensors, leaves):
    if isinstance(spec, dict) and "__tensor__" in spec:
        t = paddle.to_tensor(tensors[spec["__tensor__"]]).astype(spec["dtype"])
        if spec["dtype"].startswith(("float", "bfloat")):
            t.stop_gradient = False
            leaves.append((spec["path"], t))
        return t
    if isinstance(spec, dict) and "__tuple__" in spec:
        return tuple(build(v, tensors, leaves) for v in spec["__tuple__"])
    if isinstance(spec, dict):
        return {k: build(v, tensors, leaves) for k, v in spec.items()}
    if isinstance(spec, list):
        return [build(v, tensors, leaves) for v in spec]
    return spec


def as_numpy(t):
    return t.numpy() if t.dtype in (paddle.complex64, paddle.complex128) else t.astype("float32").numpy()


def check(what, got, want, atol, rtol):
    wide = np.complex128 if np.iscomplexobj(got) or np.iscomplexobj(want) else np.float64
    got, want = got.astype(wide), want.astype(wide)
    if got.shape != want.shape:
        print(f"{what}: shape {got.shape}, reference {want.shape}")
        return False
    diff = np.abs(got - want)
    bad = ~(diff <= atol + rtol * np.abs(want))  # NaN counts as bad
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape) if diff.size else ()
    print(f"{what}: max abs diff {np.nanmax(diff) if diff.size else 0:.3g} at {list(map(int, worst))}, "
          f"mismatched {int(bad.sum())}/{bad.size} (atol {atol:g}, rtol {rtol:g})")
    return not bad.any()


def main():
    m = json.loads((HERE / "manifest.json").read_text())
    sys.path.insert(0, m["project_root"])

    def load(target):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    port_cls, cfg_cls = load(m["port_class"]), load(m["port_config_class"])
    with paddle.LazyGuard():
        model = port_cls(cfg_cls.from_dict(m["config"]))
    layer = model if m["port_module"] == "<root>" else dict(model.named_sublayers())[m["port_module"]]
    state = layer.state_dict()
    for key, value in load_file(str(HERE / "weights_port.safetensors")).items():
        state[key].set_value(value)
    layer.eval()

    tensors = load_file(str(HERE / "tensors.safetensors"))
    leaves = []
    args = build(m["inputs"]["args"], tensors, leaves)
    kwargs = build(m["inputs"]["kwargs"], tensors, leaves)
    print(f"{m['culprit']} ({m['module_type']}): port module {m['port_module']!r} on the reference's inputs")
    tol = m["tolerance"]
    outputs = dict(flatten(layer(*args, **kwargs)))
    ok = True
    for key in sorted(k for k in tensors if k.startswith("ref_output/")):
        path = key.split("/", 1)[1]
        if path not in outputs:
            print(f"output {path}: the port module did not return it")
            ok = False
            continue
        ok &= check(f"forward output {path}", as_numpy(outputs[path]), tensors[key], **tol)

    seeds = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("output_grad/")}
    seeded = [(outputs[p], g) for p, g in seeds.items() if p in outputs and not outputs[p].stop_gradient]
    params = dict(layer.named_parameters(include_sublayers=False))
    targets = [t for _, t in leaves] + list(params.values())
    if seeded and targets:
        grads = paddle.grad([o for o, _ in seeded], targets,
                            [paddle.to_tensor(g).astype(o.dtype) for o, g in seeded], allow_unused=True)
        names = [f"ref_input_grad/{p}" for p, _ in leaves] + [f"ref_param_grad/{n}" for n in params]
        for name, g in zip(names, grads):
            if name not in tensors:
                continue
            if g is None:
                print(f"{name.split('/', 1)[1]}: no gradient reaches it in the port")
                ok = False
                continue
            ok &= check(f"gradient {name.split('/', 1)[1]}", as_numpy(g), tensors[name], **tol)
    print("MATCHES the reference" if ok else "MISMATCH reproduced")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
'''
