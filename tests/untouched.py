"""What a check or a probe must leave alone: one snapshot of a model's state and the assertion that compares two."""

from __future__ import annotations

import random

import numpy as np
import torch


def snapshot(model):
    """Everything a check must leave alone, copied: parameters, gradients, requires_grad, modes, RNG states."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return params, grads, flags, modes, rng


def assert_unchanged(before, after, *, params=True):
    """Assert two snapshots agree (``params=False``: the weights may change, e.g. around a merge)."""
    params1, grads, flags, modes, rng = before
    params2, grads2, flags2, modes2, rng2 = after
    assert params1.keys() == params2.keys()
    for name in params1:
        if params:
            assert torch.equal(params1[name], params2[name]), f"parameter {name} changed"
        assert (grads[name] is None) == (grads2[name] is None), f"gradient of {name} appeared or vanished"
        if grads[name] is not None:
            assert torch.equal(grads[name], grads2[name]), f"gradient of {name} changed"
    assert flags == flags2, "requires_grad changed"
    assert modes == modes2, "train/eval mode changed"
    assert torch.equal(rng[0], rng2[0]) and rng[1] == rng2[1], "RNG state changed"
    assert np.array_equal(rng[2], rng2[2]), "numpy RNG state changed"
