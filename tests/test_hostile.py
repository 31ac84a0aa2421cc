"""Hostile input: what a careless user or an attacker hands align. Every case is exit 2 and
one line on stderr naming the file, key, input or tensor, never a traceback; no payload ever
runs; nothing is written or changed (no hidden temporary file either)."""

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
from conftest import REGISTRY, ROOT
from safetensors.torch import save_file

from align.cli import main


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _listing(path):
    """Every file under `path` (names and sizes), hidden ones included: what must not change."""
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*"))


# ---------------------------------------------------------------- pickles that carry code


class _Payload:
    """Unpickling it calls `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    # each: (what is pickled in place of a tensor, the name the loader must refuse)
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "eval": (_Payload(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "exec": (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess": (_Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    }


def _paddle_pickle(path, payload, where, protocol):
    """A Paddle-format state dict (name -> (name, array), as paddle.save writes it) with the
    payload at the top, nested in a dict (as in a .pdopt), or inside a saved tensor's tuple."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    state = {"linear.weight": ("linear_0.w_0", w), "StructuredToParameterName@@": {"linear.weight": "linear_0.w_0"}}
    if where == "top":
        state["evil"] = payload
    elif where == "nested":
        state["optimizer"] = {"moment": {"linear.weight": payload}}
    else:
        state["linear.bias"] = ("linear_0.b_0", payload)
    path.write_bytes(pickle.dumps(state, protocol=protocol))
    return path


@pytest.mark.parametrize("payload", ["os.system", "eval", "exec", "subprocess"])
@pytest.mark.parametrize("where", ["top", "nested", "in_tensor"])
@pytest.mark.parametrize("suffix,protocol", [(".pdparams", 4), (".pdparams", 2), (".pdopt", 4)])
def test_a_paddle_pickle_payload_never_runs(tmp_path, capsys, payload, where, suffix, protocol):
    marker = tmp_path / "pwned"
    obj, name = _payloads(marker)[payload]
    src = _paddle_pickle(tmp_path / f"evil{suffix}", obj, where, protocol)
    for command in (["weights", "convert", src, tmp_path / "out.safetensors", "--model", "gemma2", "--allow-pickle"],
                    ["weights", "verify", src, tmp_path / "out.safetensors", "--model", "gemma2", "--allow-pickle"]):
        code, out, err = _cli(capsys, "--registry", REGISTRY, *command)
        assert code == 2 and not marker.exists(), (out, err)
        assert one_line(err) == (f"align: error: {src}: refused: the pickle asks for the object {name}; only "
                                 "tensors and plain data are loaded, never code")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


@pytest.mark.parametrize("payload", ["os.system", "eval", "exec"])
@pytest.mark.parametrize("layout", ["zip", "raw", "zip named .pdparams"])
def test_a_torch_pickle_payload_never_runs(tmp_path, capsys, payload, layout):
    marker = tmp_path / "pwned"
    obj, _ = _payloads(marker)[payload]
    src = tmp_path / ("evil.pdparams" if layout == "zip named .pdparams" else "evil.bin")
    torch.save({"w": torch.ones(2), "state": {"evil": obj}}, src, _use_new_zipfile_serialization=layout != "raw")
    code, out, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", src, tmp_path / "out.safetensors",
                          "--model", "gemma2", "--allow-pickle")
    assert code == 2 and not marker.exists()
    line = one_line(err)
    assert line.startswith(f"align: error: {src}: refused: the pickle asks for the object ") and "never code" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_a_persistent_id_is_refused(tmp_path, capsys):
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if isinstance(obj, bytes) else None

    src = tmp_path / "ids.pdparams"
    with open(src, "wb") as f:
        WithIds(f, protocol=4).dump({"w": b"raw"})
    code, _, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", src, tmp_path / "o.safetensors",
                        "--model", "gemma2", "--allow-pickle")
    assert code == 2 and "refused: the pickle asks for the object a persistent object (storage-0)" in one_line(err)


def test_a_pickle_checkpoint_is_refused_by_run_too(tmp_path, capsys, run_cli):
    marker = tmp_path / "pwned"
    src = _paddle_pickle(tmp_path / "evil.pdparams", _payloads(marker)["os.system"][0], "top", 4)
    code, report, err = run_cli("run", "gemma2", "--checkpoint", str(src))
    assert code == 2 and report is None and not marker.exists()
    assert "pickle-based checkpoints are refused" in one_line(err)


def test_a_real_paddle_checkpoint_loads_as_data(tmp_path, capsys):
    """What paddle.save writes (tensors as (name, array), its bookkeeping keys, bf16 as uint16)
    is read by the restricted loader, bit for bit, with no paddle.load."""
    from align.weights.pickles import load_paddle

    state = {"a.weight": paddle.randn([3, 4]), "a.bias": paddle.arange(4, dtype="int64"),
             "b": paddle.ones([2], dtype="bfloat16")}
    src = tmp_path / "model.pdparams"
    paddle.save(state, str(src))
    paddle.save({"opt": {"lr": 0.1, "m": paddle.zeros([2])}, "step": 3}, str(tmp_path / "model.pdopt"))
    loaded = load_paddle(src)
    assert sorted(loaded) == ["a.bias", "a.weight", "b"]
    np.testing.assert_array_equal(loaded["a.weight"], state["a.weight"].numpy())
    assert loaded["a.bias"].dtype == np.int64 and loaded["b"].dtype == np.uint16
    assert sorted(load_paddle(tmp_path / "model.pdopt")) == ["opt.m"]


@pytest.mark.parametrize("content,why", [
    (b"", "not a readable Paddle pickle"),
    (b"\x80\x04\x95garbage", "not a readable Paddle pickle"),
    (pickle.dumps([1, 2, 3]), "holds a list, not a dict of tensors"),
    (pickle.dumps({"w": np.array(["a"], dtype=object)}), "w: an array of object, not numbers"),
])
def test_a_pickle_that_is_no_state_dict_is_one_line(tmp_path, capsys, content, why):
    src = tmp_path / "m.pdparams"
    src.write_bytes(content)
    code, _, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", src, tmp_path / "o.safetensors",
                        "--model", "gemma2", "--allow-pickle")
    assert code == 2 and why in one_line(err) and str(src) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


# ---------------------------------------------------------------- the registry's values


@pytest.fixture
def registry_with(tmp_path):
    """align.toml with one line replaced (or appended), beside a copy of the weight rules."""
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    text = REGISTRY.read_text()

    def make(old: str | None, new: str) -> str:
        path = tmp_path / "align.toml"
        if old is None:
            path.write_text(text + "\n" + new + "\n")
        else:
            assert text.count(old) >= 1, old
            path.write_text(text.replace(old, new, 1))
        return str(path)

    return make


DEFAULT_ATOL = "atol = 1e-5\nrtol = 1e-5\n# Failing that"


@pytest.mark.parametrize("old,new,key,says", [
    (DEFAULT_ATOL, DEFAULT_ATOL.replace("1e-5", "inf", 1), "defaults.tolerance.float32.atol", "finite"),
    (DEFAULT_ATOL, DEFAULT_ATOL.replace("1e-5", "nan", 1), "defaults.tolerance.float32.atol", "finite"),
    (DEFAULT_ATOL, DEFAULT_ATOL.replace("1e-5", "-1e-5", 1), "defaults.tolerance.float32.atol", ">= 0"),
    (DEFAULT_ATOL, DEFAULT_ATOL.replace("1e-5", '"tight"', 1), "defaults.tolerance.float32.atol", "number"),
    (DEFAULT_ATOL, DEFAULT_ATOL.replace("rtol = 1e-5", "rtol = 1e999", 1), "defaults.tolerance.float32.rtol", "finite"),
    (None, "[[models.gemma2.tolerance.overrides]]\nglob = \"model.*\"\natol = -1.0\nrtol = 1e-5",
     "models.gemma2.tolerance.overrides", ">= 0"),
    (None, "[models.gemma2.tolerance]\nfactor = 0", "models.gemma2.tolerance", "factor"),
    (None, "[models.gemma2.tolerance]\nfloat64 = \"sometimes\"", "models.gemma2.tolerance.float64", "through-casts"),
    ("dtypes = [", 'dtypes = ["fp8", ', "dtypes", "fp8"),
])
def test_a_registry_value_that_makes_no_sense_is_refused(registry_with, capsys, old, new, key, says):
    path = registry_with(old, new)
    code, _, err = _cli(capsys, "--registry", path, "run", "gemma2", "--fast", "--quiet", "--out",
                        os.path.dirname(path) + "/report")
    line = one_line(err)
    assert code == 2 and line.startswith(f"align: error: {path}: ") and key.split(".")[-1] in line and says in line
    assert not os.path.exists(os.path.dirname(path) + "/report")


@pytest.mark.parametrize("old,new,names", [
    ("hidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 4", 'hidden_size = "wide"\nintermediate_size = 128\n'
     "num_hidden_layers = 4", "tiny"),
    # the config class takes it; the model it builds refuses it, and says why
    ("vocab_size = 256\nhidden_size = 64", "vocab_size = -3\nhidden_size = 64", "negative dimension -3"),
])
def test_a_config_value_of_the_wrong_kind_is_one_line(registry_with, capsys, tmp_path, old, new, names):
    path = registry_with(old, new)
    code, _, err = _cli(capsys, "--registry", path, "run", "gemma2", "--fast", "--quiet", "--out", tmp_path / "r")
    line = one_line(err)
    assert code == 2 and path in line and names in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the command line's files


@pytest.mark.parametrize("content,says", [
    ("[1, 2, 3]", "a JSON object"),
    ('{"hidden_size": 64,', "not valid JSON"),
    ('{"hidden_size": "wide"}', "hidden_size"),
    ("", "not valid JSON"),
])
def test_a_bad_config_json_is_one_line(tmp_path, capsys, content, says):
    cfg = tmp_path / "config.json"
    cfg.write_text(content)
    code, _, err = _cli(capsys, "--registry", REGISTRY, "run", "gemma2", "--config", cfg, "--fast", "--quiet",
                        "--out", tmp_path / "r")
    line = one_line(err)
    assert code == 2 and str(cfg) in line and says in line, line
    assert not (tmp_path / "r").exists()


def test_a_registry_that_is_a_directory_or_broken_is_one_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "--registry", tmp_path, "list")
    assert code == 2 and str(tmp_path) in one_line(err)
    bad = tmp_path / "align.toml"
    bad.write_text("[models.x\n")
    code, _, err = _cli(capsys, "--registry", bad, "list")
    assert code == 2 and str(bad) in one_line(err)
    code, _, err = _cli(capsys, "--registry", tmp_path / "missing.toml", "list")
    assert code == 2 and "missing.toml" in one_line(err)


@pytest.mark.parametrize("argv,says", [
    (["run", "gemma2", "--dtype", "fp128"], "--dtype"),
    (["run", "gemma2", "--frobnicate"], "--frobnicate"),
    (["frobnicate"], "frobnicate"),
    (["run", "no-such-model"], "no-such-model"),
    (["weights", "convert"], "the following arguments are required"),
    (["run", "gemma2", "--only"], "--only"),
])
def test_a_usage_error_is_one_line_that_says_where_help_is(capsys, argv, says):
    code, _, err = _cli(capsys, "--registry", REGISTRY, *argv)
    line = one_line(err)
    assert code == 2 and says in line and line.startswith("align: error: ")
    assert "--help" in line or "align list" in line


def _tiny_state():
    from align import builders
    from align.registry.load import load_registry

    spec = load_registry(REGISTRY).get("gemma2")
    ref = builders.build_reference(spec, builders.reference_config(spec, "tiny"))
    return {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}


def test_a_checkpoint_that_does_not_fit_the_model_names_the_tensor(tmp_path, capsys, run_cli):
    state = _tiny_state()
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = torch.zeros(7, 5)
    src = tmp_path / "model.safetensors"
    save_file(state, str(src))
    code, report, err = run_cli("run", "gemma2", "--checkpoint", str(src))
    line = one_line(err)
    assert code == 2 and report is None and key in line and "[7, 5]" in line and "[128, 64]" in line, line
    code, _, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", src, tmp_path / "out", "--model", "gemma2")
    line = one_line(err)
    assert code == 2 and key in line and "(7, 5)" in line and "(64, 128)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "report"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("damage", ["huge header", "offsets beyond the file", "header not json", "two bytes"])
def test_a_damaged_safetensors_is_one_line(tmp_path, capsys, damage):
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(src))
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "huge header":
        data = (1 << 60).to_bytes(8, "little") + data[8:]
    elif damage == "offsets beyond the file":
        header = json.loads(data[8:8 + n])
        header["w"]["data_offsets"] = [0, 1 << 40]
        raw = json.dumps(header).encode()
        data = len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    elif damage == "header not json":
        data = data[:8] + b"\xff" * n + data[8 + n:]
    else:
        data = data[:2]
    src.write_bytes(data)
    code, _, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", src, tmp_path / "out.safetensors",
                        "--model", "gemma2")
    assert code == 2 and str(src) in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_an_index_naming_a_shard_outside_its_directory_is_refused(tmp_path, capsys):
    (tmp_path / "secret.safetensors").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    code, _, err = _cli(capsys, "--registry", REGISTRY, "weights", "convert", ckpt, tmp_path / "out", "--model", "gemma2")
    line = one_line(err)
    assert code == 2 and "../secret.safetensors" in line and "outside" in line


# ---------------------------------------------------------------- where output goes


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, run_cli):
    out = tmp_path / "report"
    out.write_text("mine")
    code = main(["--registry", str(REGISTRY), "run", "gemma2", "--fast", "--quiet", "--out", str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and str(out) in line and out.read_text() == "mine"


def test_an_unwritable_destination_is_one_line(tmp_path, capsys):
    # /sys refuses new entries even to root: a real "cannot write here", not a mocked one.
    code = main(["--registry", str(REGISTRY), "run", "gemma2", "--fast", "--quiet", "--out", "/sys/align-report"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "/sys/align-report" in line and ("not permitted" in line or "denied" in line)


def test_running_out_of_space_is_one_line_and_leaves_nothing(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail as a full disk does, for real."""
    src = tmp_path / "ref.safetensors"
    save_file(_tiny_state(), str(src))
    dst = tmp_path / "out"
    limit = 64 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "align", "--registry", str(REGISTRY), "weights", "convert", str(src),
                           str(dst), "--model", "gemma2", "--quiet"], capture_output=True, text=True,
                          preexec_fn=small_files, cwd=tmp_path)
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and "File too large" in line and str(tmp_path) in line, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors"]


# ---------------------------------------------------------------- align's own files, damaged


def test_a_damaged_report_is_one_line(tmp_path, capsys, run_cli):
    code, report, _ = run_cli("run", "gemma2", "--fast")
    out = tmp_path / "report"
    text = (out / "report.json").read_text()
    for damaged in (text[: len(text) // 2], "[]", json.dumps({"schema_version": 3})):
        (out / "report.json").write_text(damaged)
        before = _listing(out)
        code, _, err = _cli(capsys, "report", "render", out)
        assert code == 2 and str(out / "report.json") in one_line(err)
        assert _listing(out) == before


def test_a_damaged_trace_is_one_line(tmp_path, capsys):
    trace = tmp_path / "trace"
    assert main(["--registry", str(REGISTRY), "trace", "gemma2", "--out", str(trace), "--quiet"]) == 0
    capsys.readouterr()
    damages = {
        "truncated manifest": lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:300]),
        "a call's file gone": lambda d: (d / "calls" / "00003.safetensors").unlink(),
        "a call's file cut short": lambda d: (d / "calls" / "00004.safetensors").write_bytes(b"\x10\x00"),
    }
    for what, damage in damages.items():
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(trace, copy)
        damage(copy)
        code, _, err = _cli(capsys, "--registry", REGISTRY, "check", "gemma2", "--trace", copy, "--quiet",
                            "--out", tmp_path / "r")
        assert code == 2 and str(copy) in one_line(err), (what, err)
        assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- interrupted runs


def test_stale_temporaries_of_a_killed_run_are_cleaned_and_live_ones_kept(tmp_path, run_cli):
    from align.atomic import temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "report"
    out.mkdir()
    stale = [out / temp_name("report.json", dead.pid), out / temp_name("report.html", dead.pid)]
    for p in stale:
        p.write_text("half")
    live = out / temp_name("report.json", os.getppid())  # another run, still going
    live.write_text("busy")
    code, report, _ = run_cli("run", "gemma2", "--fast")
    assert code == 0 and not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]


def test_a_run_killed_mid_write_leaves_no_report_and_the_next_cleans_up(tmp_path):
    out = tmp_path / "report"
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, signal
import align.atomic as a
def killed(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
a.os.replace = killed  # dies just before the rename that would publish report.json
from align.cli import main
main(["--registry", {str(REGISTRY)!r}, "run", "gemma2", "--fast", "--quiet", "--out", {str(out)!r}])
"""], cwd=tmp_path)
    assert child.wait() == -9
    assert not (out / "report.json").exists() and [p for p in out.iterdir() if ".align-tmp-" in p.name]
    assert main(["--registry", str(REGISTRY), "run", "gemma2", "--fast", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["verdict"] == "pass"
    assert not [p for p in out.iterdir() if ".align-tmp-" in p.name]


def test_a_killed_runs_scratch_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    """Spilled gradients, a trace between two processes: scratch folders in the system's
    temporary directory, which kill -9 leaves behind; the next of their kind removes them."""
    import tempfile

    from align.atomic import scratch, temp_name

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temporary directory
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / temp_name("align-spill", dead.pid)
    stale.mkdir()
    (stale / "grads.bin").write_bytes(b"\0" * 1024)
    with scratch("spill") as mine:
        assert mine.is_dir() and mine.parent == tmp_path and not stale.exists()
    assert not mine.exists() and list(tmp_path.iterdir()) == []
