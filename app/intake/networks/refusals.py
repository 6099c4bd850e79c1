"""Refusal messages that name what the user wrote, why it cannot be decoupled, and what to do.

Exporters rewrite layers into ops the user never wrote (GELU → Div/Erf/Add/Mul, SiLU →
Sigmoid·x, Mish → Softplus/Tanh/Mul); the message names the layer where it can be recognised.
"""

from __future__ import annotations

SOFTMAX_FLAG_HINT = (" — pass --strip-softmax to import the logits instead (predictions are unchanged, "
                     "softmax is monotone; /predict then returns logits as outputs), or export the logits")

WHAT_TO_DO = ("use a piecewise-linear activation (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh/clip) and "
              "retrain, or export the part of the network before it")

# op → (the layer people write that becomes it, why it is not piecewise linear)
_LAYERS = {
    "Erf": ("GELU", "GELU = x·Φ(x) is smooth: no finite set of linear pieces"),
    "Gelu": ("GELU", "GELU = x·Φ(x) is smooth: no finite set of linear pieces"),
    "gelu": ("GELU", "GELU = x·Φ(x) is smooth: no finite set of linear pieces"),
    "erf": ("GELU", "GELU = x·Φ(x) is smooth: no finite set of linear pieces"),
    "Sigmoid": ("Sigmoid or SiLU/Swish (x·sigmoid(x))", "sigmoid is smooth"),
    "sigmoid": ("Sigmoid or SiLU/Swish (x·sigmoid(x))", "sigmoid is smooth"),
    "silu": ("SiLU/Swish", "x·sigmoid(x) is smooth"),
    "Tanh": ("Tanh (or Mish / GELU-tanh)", "tanh is smooth; Hardtanh is its piecewise-linear cousin"),
    "tanh": ("Tanh (or Mish / GELU-tanh)", "tanh is smooth; Hardtanh is its piecewise-linear cousin"),
    "Softplus": ("Softplus or Mish", "softplus is smooth"),
    "softplus": ("Softplus or Mish", "softplus is smooth"),
    "Elu": ("ELU", "ELU's negative side is exponential"),
    "elu": ("ELU", "ELU's negative side is exponential"),
    "Selu": ("SELU", "SELU's negative side is exponential"),
    "Celu": ("CELU", "CELU's negative side is exponential"),
    "HardSwish": ("Hardswish", "x·relu6(x+3)/6 is quadratic between its breakpoints"),
    "hardswish": ("Hardswish", "x·relu6(x+3)/6 is quadratic between its breakpoints"),
    "HardSigmoid": ("Hardsigmoid", "not supported yet (it is piecewise linear: an affine map then a clip)"),
    "LayerNormalization": ("LayerNorm", "it divides by a per-sample standard deviation"),
    "layer_norm": ("LayerNorm", "it divides by a per-sample standard deviation"),
    "native_layer_norm": ("LayerNorm", "it divides by a per-sample standard deviation"),
    "Exp": ("an exponential", "exp is smooth"), "Log": ("a logarithm", "log is smooth"),
    "LSTM": ("LSTM", "gates are sigmoids and products of activations"),
    "GRU": ("GRU", "gates are sigmoids and products of activations"),
}


def why_not_piecewise(op: str, others: list[str] | None = None) -> str:
    """'… (from the GELU layer): why; what to do' for a refused op."""
    layer, why = _LAYERS.get(op, (None, "not piecewise linear"))
    if op in ("Sigmoid", "sigmoid") and others and ("Mul" in others or "mul" in others):
        layer = "SiLU/Swish (x·sigmoid(x)) or Sigmoid"
    where = f" (this is how {layer} is exported)" if layer else ""
    return (f"{why}, so not piecewise linear{where}; the decoupling needs piecewise-linear activations: "
            f"{WHAT_TO_DO}")
