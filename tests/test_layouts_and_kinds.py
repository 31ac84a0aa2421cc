"""What real layers and real signals bring, through the whole pipeline on small models written
here (a registry of their own names this module's builders):
- a spectral model whose modules return a complex STFT and integer peak indices, one input
  passed by position: complex tensors compare as complex, integers exactly;
- a weight-normed convolution stack, torch's two weight-norm styles against Paddle's: the
  weights map by the layer's type (weight_g's shape) and the load is proven bit-exact."""

import math

import numpy as np
import paddle
import pytest
import torch

from align.compare.metrics import compare_arrays
from align.registry.spec import Tolerance

N_FFT, HOP = 32, 8


class TorchFrames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, x):  # (B, T) -> complex (B, F, K)
        return torch.fft.rfft(x.unfold(-1, N_FFT, HOP) * self.window, dim=-1).transpose(1, 2)


class TorchPeak(torch.nn.Module):
    def forward(self, magnitude):  # (B, F, K) -> int64 (B, K)
        return magnitude.argmax(dim=1)


class TorchSpectral(torch.nn.Module):
    def __init__(self, channels: int = 6):
        super().__init__()
        self.frames = TorchFrames()
        self.peak = TorchPeak()
        self.proj = torch.nn.Linear(N_FFT // 2 + 1, channels)

    def forward(self, x, gain):  # (B, 1, T), (1,)
        spectrum = self.frames(x.squeeze(1)) * gain  # complex * real, (B, F, K)
        magnitude = spectrum.abs()
        return {"out": self.proj(magnitude.transpose(1, 2)), "peaks": self.peak(magnitude), "spectrum": spectrum}


class PaddleFrames(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        n = np.arange(N_FFT)
        self.register_buffer("window", paddle.to_tensor((0.5 - 0.5 * np.cos(2 * math.pi * n / N_FFT)).astype("float32")),
                             persistable=False)

    def forward(self, x):
        frames = paddle.signal.frame(x, N_FFT, HOP, axis=-1)  # (B, n, K)
        return paddle.fft.rfft(frames * self.window.unsqueeze(-1), axis=1)  # (B, F, K)


class PaddlePeak(paddle.nn.Layer):
    def forward(self, magnitude):
        return magnitude.argmax(axis=1)


class PaddleSpectral(paddle.nn.Layer):
    def __init__(self, channels: int = 6):
        super().__init__()
        self.frames = PaddleFrames()
        self.peak = PaddlePeak()
        self.proj = paddle.nn.Linear(N_FFT // 2 + 1, channels)

    def forward(self, x, gain):
        spectrum = self.frames(x.squeeze(1)) * gain.astype("complex64")
        magnitude = paddle.abs(spectrum)
        return {"out": self.proj(magnitude.transpose([0, 2, 1])), "peaks": self.peak(magnitude), "spectrum": spectrum}


def torch_wn(channels: int = 4) -> torch.nn.Module:
    """A conv stack with both of torch's weight norms: the old hook, and the parametrization."""
    from torch.nn.utils import parametrizations, weight_norm

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = weight_norm(torch.nn.Conv1d(1, channels, 5, padding=2))
            self.conv_up = parametrizations.weight_norm(torch.nn.ConvTranspose1d(channels, channels, 4, stride=2,
                                                                                 padding=1))
            self.conv_out = torch.nn.Conv1d(channels, 1, 3, padding=1)

        def forward(self, audio):
            return self.conv_out(torch.tanh(self.conv_up(torch.tanh(self.conv_in(audio)))))

    return Stack()


def paddle_wn(channels: int = 4, norm_dim: int = 0) -> paddle.nn.Layer:
    wn = paddle.nn.utils.weight_norm

    class Stack(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv_in = wn(paddle.nn.Conv1D(1, channels, 5, padding=2), dim=norm_dim)
            self.conv_up = wn(paddle.nn.Conv1DTranspose(channels, channels, 4, stride=2, padding=1))
            self.conv_out = paddle.nn.Conv1D(channels, 1, 3, padding=1)

        def forward(self, audio):
            return self.conv_out(paddle.tanh(self.conv_up(paddle.tanh(self.conv_in(audio)))))

    return Stack()


REGISTRY_TEXT = '''
[defaults]
dtypes = ["float32"]
[defaults.tolerance.float32]
atol = 1e-5
rtol = 1e-5
[defaults.tolerance.bfloat16]
factor = 2.0
floor = 1e-3

[models.spectral]
[models.spectral.reference]
class = "test_layouts_and_kinds:TorchSpectral"
[models.spectral.port]
class = "test_layouts_and_kinds:PaddleSpectral"
[models.spectral.init]
seed = 0
std = 0.1
[models.spectral.inputs]
seed = 3
[models.spectral.inputs.x]
kind = "audio"
batch = 2
samples = 128
requires_grad = true
position = 0
[models.spectral.inputs.gain]
kind = "float"
shape = [1]
distribution = "uniform"
low = 0.5
high = 2.0
[models.spectral.configs.tiny]
channels = 6

[models.wn]
[models.wn.reference]
builder = "test_layouts_and_kinds:torch_wn"
[models.wn.port]
builder = "test_layouts_and_kinds:paddle_wn"
[models.wn.init]
seed = 0
std = 0.1
[models.wn.inputs]
seed = 1
[models.wn.inputs.audio]
kind = "audio"
batch = 2
samples = 64
requires_grad = true
[models.wn.configs.tiny]
channels = 4
'''


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "align.toml"
    path.write_text(REGISTRY_TEXT)
    return path


def _run(registry, tmp_path, capsys, model, *args):
    import json

    from align.cli import main

    out = tmp_path / "report"
    code = main(["--registry", str(registry), "run", model, "--quiet", "--out", str(out), *args])
    err = capsys.readouterr().err
    path = out / "report.json"
    return code, (json.loads(path.read_text()) if path.exists() else None), err


def test_complex_and_integer_outputs_align(registry, tmp_path, capsys, bug_ledger):
    code, report, _ = _run(registry, tmp_path, capsys, "spectral")
    bug_ledger.record_clean("spectral (complex and integer outputs)", false_alarm=code != 0)
    assert code == 0, report["problems"]
    outputs = {o["name"]: o for o in report["outputs"]}
    assert set(outputs) == {"out", "peaks", "spectrum"}
    assert outputs["peaks"]["max_abs"] == 0 and outputs["peaks"]["numel"] == 2 * 13
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    frames = next(layer for layer in tf["layers"] if layer["name"] == "frames")
    assert frames["forward"]["passed"] and frames["backward"]["passed"]  # a complex output and its gradient
    assert [g["name"] for g in report["input_grads"]] == ["input:x"] and report["input_grads"][0]["passed"]


@pytest.mark.parametrize("bug,culprit", [("conjugated", "frames"), ("argmin", "peak")])
def test_complex_and_integer_bugs_are_caught_where_they_are(bug, culprit, registry, tmp_path, capsys, monkeypatch,
                                                           bug_ledger):
    if bug == "conjugated":
        forward = PaddleFrames.forward
        monkeypatch.setattr(PaddleFrames, "forward", lambda self, x: paddle.conj(forward(self, x)))
    else:
        monkeypatch.setattr(PaddlePeak, "forward", lambda self, m: m.argmin(axis=1))
    code, report, _ = _run(registry, tmp_path, capsys, "spectral")
    localized = report["culprits"]["forward"] == [culprit]
    bug_ledger.record(f"spectral:{bug}", "complex/integer", code == 1, localized)
    assert code == 1 and localized, report["culprits"]
    if bug == "argmin":
        layer = next(layer for r in report["runs"] if r["mode"] == "teacher_forced" for layer in r["layers"]
                     if layer["name"] == "peak")
        assert layer["forward"]["note"].startswith("integers compare exactly: ")


def test_complex_metrics_by_hand():
    tol = Tolerance(1e-5, 1e-5)
    e = np.array([1 + 1j, 3 - 4j], dtype=np.complex64)
    assert compare_arrays(e.copy(), e, tol).passed
    m = compare_arrays(np.conj(e), e, tol)  # |conj(z) - z| = 2 |Im z|: 2 and 8
    assert not m.passed and m.mismatched == 2 and m.max_abs == pytest.approx(8.0)
    assert m.cosine == pytest.approx(-7 / 27)  # Re sum(z^2) / |e|^2: Re(2i + (-7 - 24i)) / 27
    assert not compare_arrays(e.real.copy(), e, tol).passed  # a real port for a complex reference
    ints = compare_arrays(np.array([1, 2, 3]), np.array([1, 2, 4]), tol)
    assert not ints.passed and ints.mismatched == 1 and ints.note == "integers compare exactly: 1 of 3 differ"


def test_weight_norm_maps_by_layer_type_and_loads_bit_exact(registry, tmp_path, capsys, bug_ledger):
    code, report, _ = _run(registry, tmp_path, capsys, "wn")
    bug_ledger.record_clean("weight-normed convolutions", false_alarm=code != 0)
    assert code == 0, report["problems"]
    weights = {w["source"]: w for w in report["weights"]}
    g_old, g_new = weights["conv_in.weight_g"], weights["conv_up.parametrizations.weight.original0"]
    assert (g_old["source_shape"], g_old["target_shape"], g_old["transform"]) == ([4, 1, 1], [4], "reshape")
    assert g_new["target"] == "conv_up.weight_g" and g_new["target_shape"] == [4] and g_new["exact"]
    assert weights["conv_up.parametrizations.weight.original1"]["target"] == "conv_up.weight_v"
    grads = {g["name"]: g for g in report["param_grads"]}
    assert grads["conv_up.parametrizations.weight.original0"]["passed"]  # brought back to (4, 1, 1)
    allowed = {u["name"] for u in report["unpaired"] if u["allowed"]}
    assert "conv_up.parametrizations.weight" in allowed


def test_a_weight_norm_over_the_wrong_axis_cannot_be_mapped(registry, tmp_path, capsys, monkeypatch):
    import test_layouts_and_kinds as here

    original = here.paddle_wn
    monkeypatch.setattr(here, "paddle_wn", lambda channels=4: original(channels, norm_dim=1))
    code, report, err = _run(registry, tmp_path, capsys, "wn")
    assert code == 2 and report is None
    assert err.strip().splitlines() == ["align: error: conv_in.weight_g -> conv_in.weight_g: cannot reshape "
                                        "(4, 1, 1) (4 elements) to the port's (1,) (1) (same name, reshaped: "
                                        "Conv1D.weight_g is [1] in Paddle)"]
