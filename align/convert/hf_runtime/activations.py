"""ACT2FN: activation layers by HF's config names. Each is a layer, as in transformers, so
the module tree (`mlp.act_fn`) and its pairing are the same on both sides."""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F


class GELUActivation(paddle.nn.Layer):
    """Exact (erf) GELU: HF's "gelu"."""

    def forward(self, x):
        return F.gelu(x)


class GELUTanh(paddle.nn.Layer):
    """The tanh approximation: HF's "gelu_pytorch_tanh" (torch's approximate="tanh")."""

    def forward(self, x):
        return F.gelu(x, approximate=True)


class NewGELUActivation(paddle.nn.Layer):
    """HF's "gelu_new": the tanh formula written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * paddle.pow(x, 3.0))))


class QuickGELUActivation(paddle.nn.Layer):
    def forward(self, x):
        return x * F.sigmoid(1.702 * x)


class SiLUActivation(paddle.nn.Layer):
    def forward(self, x):
        return F.silu(x)


class ReLU(paddle.nn.Layer):
    def forward(self, x):
        return F.relu(x)


class Tanh(paddle.nn.Layer):
    def forward(self, x):
        return paddle.tanh(x)


class Sigmoid(paddle.nn.Layer):
    def forward(self, x):
        return F.sigmoid(x)


class LinearActivation(paddle.nn.Layer):
    def forward(self, x):
        return x


_ACT2CLS = {
    "gelu": GELUActivation,
    "gelu_pytorch_tanh": GELUTanh,
    "gelu_new": NewGELUActivation,
    "quick_gelu": QuickGELUActivation,
    "silu": SiLUActivation,
    "swish": SiLUActivation,
    "relu": ReLU,
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "linear": LinearActivation,
}


class _Instantiator(dict):
    """ACT2FN[name] -> a fresh layer, as transformers' ClassInstantier does."""

    def __getitem__(self, name: str) -> paddle.nn.Layer:
        if name not in _ACT2CLS:
            raise KeyError(f"activation {name!r} is not in align's runtime (known: {', '.join(sorted(_ACT2CLS))})")
        return _ACT2CLS[name]()

    def __contains__(self, name: object) -> bool:
        return name in _ACT2CLS


ACT2FN = _Instantiator()


def get_activation(name: str) -> paddle.nn.Layer:
    return ACT2FN[name]
