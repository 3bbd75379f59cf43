"""sdtune's EMA update (one lerp per tensor) against diffusers' EMAModel, whose schedule it keeps."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from sdtune.training.ema import LerpEMA


@pytest.mark.parametrize("foreach", [False, True])
def test_lerp_ema_follows_diffusers_ema_model_step_by_step(foreach):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(64, 32), (32,), (3, 3, 4, 4)]]
    ours = LerpEMA(weights, decay=0.7, foreach=foreach)
    theirs = EMAModel(weights, decay=0.7, foreach=False)
    for _ in range(30):  # through diffusers' warm-up (decay (1 + step) / (10 + step)) up to its cap
        with torch.no_grad():
            for weight in weights:
                weight.add_(torch.randn(weight.shape, generator=generator))
        ours.step(weights)
        theirs.step(weights)
        assert ours.cur_decay_value == theirs.cur_decay_value
        for mine, reference in zip(ours.shadow_params, theirs.shadow_params):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
    assert ours.cur_decay_value == 0.7
    assert not torch.equal(ours.shadow_params[0], weights[0])  # an average, not a copy
    assert ours.state_dict()["optimization_step"] == 30


def test_lerp_ema_averages_tensors_without_requires_grad():
    """DeepSpeed's fp32 master fragments come as plain tensors: averaged, not copied."""
    weight = torch.zeros(4)
    ema = LerpEMA([weight], decay=0.5, foreach=False)
    ema.step([weight])  # step 1: decay 0 (diffusers' warm-up): the shadow takes the weight
    weight.fill_(1.0)
    ema.step([weight])  # step 2: decay min(0.5, 2/11)
    assert torch.allclose(ema.shadow_params[0], torch.full((4,), 1 - 2 / 11))
    with pytest.raises(ValueError, match="holds 1 tensors but was given 2"):
        ema.step([weight, weight])
