"""Plain-math helpers of the loss tests (hand-computed references, worked in comments)."""
import math

import torch

LN2 = 0.6931471805599453


def softplus(x):  # −logσ(−x) = log(1 + e^x), plain math
    return math.log1p(math.exp(x))


def nll_sigmoid(x):  # −logσ(x)
    return softplus(-x)


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype)


def close(a, b, tol=1e-9):
    a = a.detach() if torch.is_tensor(a) else a
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def random_leaf(*shape, seed=0, scale=1.0):
    """A float64 leaf tensor for gradchecks."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()
