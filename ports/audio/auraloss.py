"""auraloss' SISDRLoss and MultiResolutionSTFTLoss in Paddle.

Reference: auraloss 0.4.0 (PyPI wheel), auraloss/time.py (SISDRLoss) and auraloss/freq.py
(SpectralConvergenceLoss, STFTMagnitudeLoss, STFTLoss, MultiResolutionSTFTLoss), with
auraloss/utils.py (apply_reduction). Class names, constructor arguments and defaults, and the
module tree follow the reference one to one, so modules pair by name:

    stft_losses.{i}                    STFTLoss
    stft_losses.{i}.spectralconv       SpectralConvergenceLoss
    stft_losses.{i}.logstft            STFTMagnitudeLoss(log=True)
    stft_losses.{i}.logstft.distance   L1Loss (MSELoss for mag_distance="L2")
    stft_losses.{i}.linstft            STFTMagnitudeLoss(log=False)
    stft_losses.{i}.linstft.distance   L1Loss (MSELoss for mag_distance="L2")

There are no parameters, so there is nothing to map; the constructor's keyword arguments are
the config, the same ones the reference takes.

Deliberate differences from the reference:
- Not supported, raising NotImplementedError: `scale="mel"/"chroma"` (librosa filterbanks),
  `perceptual_weighting=True` (the scipy-designed FIRFilter prefilter), and windows other than
  the five the reference documents (hann, hamming, blackman, bartlett, kaiser).
- `device` is accepted and ignored: the reference uses it only to place the mel filterbank.
- The reference keeps the window as a plain attribute; here it is a non-persistable buffer
  `window` of length win_length, so it is in no state_dict on either side.
- The STFT is framed by hand (reflect pad, paddle.signal.frame, rfft) instead of
  paddle.signal.stft, which asserts n_fft <= len(x) before padding where torch.stft accepts any
  len(x) > n_fft // 2; the arithmetic is the same.
- Long reductions run in float64 and are rounded once: the Frobenius norms, the scale-invariance
  sums and SISDR's sums over time. Paddle 3.3.1's float32 sums drift where torch's do not (see
  _sum_fp64); in float64 the two frameworks agree to ~1e-13, so this only closes rounding.
- An `output` other than "loss"/"full" raises ValueError; the reference silently returns None.
- Unequal fft_sizes/hop_sizes/win_lengths raise ValueError; the reference asserts.

Known limits of any fp32 comparison (measured against the reference, not fixable in a port):
- The log-magnitude term's gradient goes as 1 / |X| and the L1 sign flips at near-ties, so at a
  few bins of small magnitude the reference's own fp32 gradient is 1e-5..5e-5 away from its
  float64 gradient; the port's is as far, on different elements. In float64 the port matches the
  reference to ~1e-13 relative, gradients included.
- The phase term (w_phs) is ill-posed at frame 0: the reflect-padded first frame and the window are
  both symmetric about n_fft / 2, so that frame's spectrum is real, and where it is negative its
  phase is +pi or -pi by the sign of a rounding error. The two frameworks' FFTs round differently,
  so w_phs=1 losses differ by ~1e-3 relative, in fp32 and in float64 alike.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def _apply_reduction(losses, reduction="none"):
    """auraloss.utils.apply_reduction: "mean" or "sum"; anything else leaves the losses as they are."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _sum_fp64(x, axis=None):
    """A float32 sum taken in float64 and rounded once. Paddle 3.3.1's float32 sum drifts: the norm
    of 2 x 513 x 134 values lands 7e-6 relative from the exact one, torch's 1e-7, and so the spectral
    convergence ratio 6.5e-5 relative from torch's (3e-7 with this)."""
    return x.astype("float64").sum(axis=axis).astype(x.dtype)


# ---------------------------------------------------------------------------- time domain


class SISDRLoss(nn.Layer):
    """Negative scale-invariant signal-to-distortion ratio (Le Roux et al., 2018), in dB."""

    def __init__(self, zero_mean=True, eps=1e-8, reduction="mean"):
        super().__init__()
        self.zero_mean = zero_mean
        self.eps = eps
        self.reduction = reduction

    def forward(self, input, target):  # (B, C, T) each, or any (..., T)
        T = input.shape[-1]
        # Every sum over time in float64 (see _sum_fp64): fp32 sums put the loss 1.4e-6 relative
        # from the float64 value, where torch's fp32 is at 6e-8.
        if self.zero_mean:
            input = input - _sum_fp64(input, axis=-1).unsqueeze(-1) / T
            target = target - _sum_fp64(target, axis=-1).unsqueeze(-1) / T
        alpha = _sum_fp64(input * target, axis=-1) / (_sum_fp64(target**2, axis=-1) + self.eps)  # (B, C)
        target = target * alpha.unsqueeze(-1)  # the target's projection, (B, C, T)
        res = input - target
        # eps twice, inside the denominator and inside the log, exactly where the reference has them.
        ratio = _sum_fp64(target**2, axis=-1) / (_sum_fp64(res**2, axis=-1) + self.eps)  # (B, C)
        losses = 10 * paddle.log10(ratio + self.eps)
        return -_apply_reduction(losses, self.reduction)


# ---------------------------------------------------------------------------- frequency domain

_WINDOW_NAMES = ("hann_window", "hamming_window", "blackman_window", "bartlett_window", "kaiser_window")


def _torch_window(name: str, length: int) -> paddle.Tensor:
    """`getattr(torch, name)(length)` as auraloss calls it: torch's defaults, so periodic=True (and
    beta=12 for kaiser), float32. Built in float64 and rounded once: within 1 ulp of torch's."""
    if name not in _WINDOW_NAMES:
        raise NotImplementedError(f"window {name!r} is not ported; choose one of {', '.join(_WINDOW_NAMES)}")
    if length == 1:
        return paddle.ones([1], dtype="float32")  # torch's special case, periodic or not
    # periodic=True: the symmetric window of length + 1 with its last sample dropped.
    M = length + 1
    n = np.arange(M, dtype=np.float64)
    phase = 2 * np.pi * n / (M - 1)
    if name == "hann_window":
        w = 0.5 - 0.5 * np.cos(phase)
    elif name == "hamming_window":
        w = 0.54 - 0.46 * np.cos(phase)
    elif name == "blackman_window":
        w = 0.42 - 0.5 * np.cos(phase) + 0.08 * np.cos(2 * phase)
    elif name == "bartlett_window":
        # torch's split point: the rising half holds ((M - 1) >> 1) + 1 samples.
        w = np.where(n < ((M - 1) >> 1) + 1, 2 * n / (M - 1), 2 - 2 * n / (M - 1))
    else:
        half = (M - 1) / 2
        w = np.i0(12.0 * np.sqrt(np.clip(1 - ((n - half) / half) ** 2, 0, None))) / np.i0(12.0)
    return paddle.to_tensor(w[:-1].astype(np.float32))


def _stft(x, n_fft: int, hop_length: int, win_length: int, window):
    """torch.stft(x, n_fft, hop_length, win_length, window, return_complex=True) with the defaults
    auraloss relies on: center=True, pad_mode="reflect", normalized=False, onesided=True.

    x (N, T) -> complex (N, n_fft // 2 + 1, 1 + T // hop_length).
    """
    if not 0 < win_length <= n_fft:
        raise ValueError(f"win_length must be in (0, n_fft={n_fft}], got {win_length}")
    # torch centres a shorter window inside n_fft with zeros, the left side getting the floor.
    left = (n_fft - win_length) // 2
    window = F.pad(window, [left, n_fft - win_length - left], mode="constant")  # (n_fft,)
    pad = n_fft // 2
    # center=True: reflect-pad n_fft // 2 on both sides (edge sample not repeated), as torch.
    x = F.pad(x.unsqueeze(1), [pad, pad], mode="reflect", data_format="NCL").squeeze(1)  # (N, T + 2 pad)
    frames = paddle.signal.frame(x, n_fft, hop_length, axis=-1)  # (N, n_fft, K)
    return paddle.fft.rfft(frames * window.unsqueeze(-1), axis=1)  # (N, n_fft // 2 + 1, K), unnormalised


class SpectralConvergenceLoss(nn.Layer):
    """||y - x||_F / ||y||_F over the whole batch of magnitudes (Arik et al., 2018)."""

    def forward(self, x_mag, y_mag):  # (N, F, K) each -> ()
        # sqrt of a float64 sum; paddle.linalg.norm, like torch.norm, gives a zero gradient at
        # zero, where sqrt(sum(d**2)) gives NaN (input == target exactly).
        num = paddle.linalg.norm((y_mag - x_mag).astype("float64").flatten())
        den = paddle.linalg.norm(y_mag.astype("float64").flatten())
        return (num / den).astype(x_mag.dtype)


class STFTMagnitudeLoss(nn.Layer):
    """L1 (or L2) distance between (log-)magnitudes."""

    def __init__(self, log=True, distance="L1", reduction="mean"):
        super().__init__()
        self.log = log
        if distance == "L1":
            self.distance = nn.L1Loss(reduction=reduction)
        elif distance == "L2":
            self.distance = nn.MSELoss(reduction=reduction)
        else:
            raise ValueError(f"Invalid distance: '{distance}'.")

    def forward(self, x_mag, y_mag):  # (N, F, K) each
        if self.log:
            x_mag = paddle.log(x_mag)
            y_mag = paddle.log(y_mag)
        return self.distance(x_mag, y_mag)


class STFTLoss(nn.Layer):
    """Weighted sum of spectral convergence, log- and linear-magnitude and phase losses at one
    resolution (Yamamoto et al., 2019)."""

    def __init__(
        self,
        fft_size: int = 1024,
        hop_size: int = 256,
        win_length: int = 1024,
        window: str = "hann_window",
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
        w_phs: float = 0.0,
        sample_rate: float | None = None,
        scale: str | None = None,
        n_bins: int | None = None,
        perceptual_weighting: bool = False,
        scale_invariance: bool = False,
        eps: float = 1e-8,
        output: str = "loss",
        reduction: str = "mean",
        mag_distance: str = "L1",
        device=None,
    ):
        super().__init__()
        if scale is not None:
            raise NotImplementedError(
                f"scale={scale!r} is not ported (the reference builds a librosa filterbank); use scale=None"
            )
        if perceptual_weighting:
            raise NotImplementedError(
                "perceptual_weighting=True is not ported (the reference's A-weighting FIRFilter); use False"
            )
        if output not in ("loss", "full"):
            raise ValueError(f"output must be 'loss' or 'full', got {output!r}")
        self.fft_size = fft_size
        self.hop_size = hop_size
        self.win_length = win_length
        self.register_buffer("window", _torch_window(window, win_length), persistable=False)  # (win_length,)
        self.w_sc = w_sc
        self.w_log_mag = w_log_mag
        self.w_lin_mag = w_lin_mag
        self.w_phs = w_phs
        self.sample_rate = sample_rate
        self.scale = scale
        self.n_bins = n_bins
        self.perceptual_weighting = perceptual_weighting
        self.scale_invariance = scale_invariance
        self.eps = eps
        self.output = output
        self.reduction = reduction
        self.mag_distance = mag_distance
        self.device = device

        self.spectralconv = SpectralConvergenceLoss()
        self.logstft = STFTMagnitudeLoss(log=True, reduction=reduction, distance=mag_distance)
        self.linstft = STFTMagnitudeLoss(log=False, reduction=reduction, distance=mag_distance)

    def stft(self, x):
        """x (N, T) -> magnitude and phase, (N, fft_size // 2 + 1, K) each."""
        x_stft = _stft(x, self.fft_size, self.hop_size, self.win_length, self.window)
        # The power is clamped at eps before the sqrt, so log(mag) stays finite at silent bins.
        x_mag = paddle.sqrt(paddle.clip(paddle.real(x_stft) ** 2 + paddle.imag(x_stft) ** 2, min=self.eps))
        # paddle.angle, not atan2(imag, real): its gradient is 0 at 0 + 0j as torch.angle's, atan2's is NaN.
        x_phs = paddle.angle(x_stft)
        return x_mag, x_phs

    def forward(self, input, target):  # (B, C, T) each
        bs, chs, seq_len = input.shape
        x_mag, x_phs = self.stft(input.reshape([-1, seq_len]))  # (B*C, F, K)
        y_mag, y_phs = self.stft(target.reshape([-1, seq_len]))

        if self.scale_invariance:
            alpha = _sum_fp64(x_mag * y_mag, axis=[-2, -1]) / _sum_fp64(y_mag**2, axis=[-2, -1])  # (B*C,)
            # (B*C, 1) broadcasts from the right against (B*C, F, K), exactly as in the reference:
            # so this works only when B*C == 1 (or B*C == F), and fails there as it fails here.
            y_mag = y_mag * alpha.unsqueeze(-1)

        # A term whose weight is 0 is not computed at all (so its module's hooks never fire).
        sc_mag_loss = self.spectralconv(x_mag, y_mag) if self.w_sc else 0.0
        log_mag_loss = self.logstft(x_mag, y_mag) if self.w_log_mag else 0.0
        lin_mag_loss = self.linstft(x_mag, y_mag) if self.w_lin_mag else 0.0
        phs_loss = F.mse_loss(x_phs, y_phs) if self.w_phs else 0.0

        loss = (
            self.w_sc * sc_mag_loss
            + self.w_log_mag * log_mag_loss
            + self.w_lin_mag * lin_mag_loss
            + self.w_phs * phs_loss
        )
        loss = _apply_reduction(loss, reduction=self.reduction)
        if self.output == "loss":
            return loss
        return loss, sc_mag_loss, log_mag_loss, lin_mag_loss, phs_loss


class MultiResolutionSTFTLoss(nn.Layer):
    """The mean of STFTLoss over several (fft_size, hop_size, win_length) resolutions."""

    def __init__(
        self,
        fft_sizes=(1024, 2048, 512),
        hop_sizes=(120, 240, 50),
        win_lengths=(600, 1200, 240),
        window: str = "hann_window",
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
        w_phs: float = 0.0,
        sample_rate: float | None = None,
        scale: str | None = None,
        n_bins: int | None = None,
        perceptual_weighting: bool = False,
        scale_invariance: bool = False,
        **kwargs,
    ):
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError(
                f"fft_sizes, hop_sizes and win_lengths must have one entry per resolution, "
                f"got {len(fft_sizes)}, {len(hop_sizes)} and {len(win_lengths)}"
            )
        self.fft_sizes = list(fft_sizes)
        self.hop_sizes = list(hop_sizes)
        self.win_lengths = list(win_lengths)
        self.stft_losses = nn.LayerList(
            [
                STFTLoss(
                    fs, ss, wl, window, w_sc, w_log_mag, w_lin_mag, w_phs,
                    sample_rate, scale, n_bins, perceptual_weighting, scale_invariance, **kwargs,
                )
                for fs, ss, wl in zip(fft_sizes, hop_sizes, win_lengths)
            ]
        )

    def forward(self, x, y):  # (B, C, T) each
        mrstft_loss = 0.0
        sc_mag_loss, log_mag_loss, lin_mag_loss, phs_loss = [], [], [], []
        for f in self.stft_losses:
            if f.output == "full":  # the aggregate first, then each term per resolution
                loss, sc, log_mag, lin_mag, phs = f(x, y)
                mrstft_loss += loss
                sc_mag_loss.append(sc)
                log_mag_loss.append(log_mag)
                lin_mag_loss.append(lin_mag)
                phs_loss.append(phs)
            else:
                mrstft_loss += f(x, y)
        mrstft_loss /= len(self.stft_losses)
        # The reference decides the return shape from the last resolution's `output`.
        if f.output == "loss":
            return mrstft_loss
        return mrstft_loss, sc_mag_loss, log_mag_loss, lin_mag_loss, phs_loss


__all__ = [
    "MultiResolutionSTFTLoss",
    "SISDRLoss",
    "STFTLoss",
    "STFTMagnitudeLoss",
    "SpectralConvergenceLoss",
]
