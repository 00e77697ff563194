"""Check for methods whose loss comes in parts (``LossInParts``): the trainer's path, one backward
per part, gives the value, metrics and gradients of ``loss().backward()``."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def assert_backward_loss_matches_loss(method: Any, batch: Any, expected_parts: int) -> dict[str, Any]:
    params = [p for p in method.named_trainable_parameters().values()]
    for p in params:
        p.grad = None
    whole, metrics = method.loss(batch)
    whole.backward()
    expected = [None if p.grad is None else p.grad.clone() for p in params]
    assert any(g is not None and g.abs().sum() > 0 for g in expected)  # a loss with a real gradient
    for p in params:
        p.grad = None
    parts: list[torch.Tensor] = []
    total, stepwise_metrics = method.backward_loss(batch, lambda part: (parts.append(part.detach()), part.backward()))
    assert len(parts) == expected_parts > 1
    assert total.item() == pytest.approx(whole.detach().item(), rel=1e-5, abs=1e-7)
    assert stepwise_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert float(torch.as_tensor(stepwise_metrics[key]).float().mean()) == pytest.approx(
            float(torch.as_tensor(value).float().mean()), rel=1e-5, abs=1e-7), key
    for got, want in zip((p.grad for p in params), expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    return metrics
