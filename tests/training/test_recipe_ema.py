"""The weight EMA equals timm's ModelEmaV3 (the real timm.utils.model_ema code) fed the same parameter sequence,
with and without warm-up, as timm's train.py calls it (update(model, step=num_updates) after each update)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from timm.utils.model_ema import ModelEmaV3

from vit_train import ema


@pytest.mark.parametrize('decay,warmup', [(0.9998, False), (0.99, False), (0.9999, True), (0.6, False)])
def test_ema_equals_model_ema_v3_on_the_same_parameter_sequence(decay, warmup):
    rng = np.random.default_rng(0)
    net = torch.nn.Linear(7, 5)
    v3 = ModelEmaV3(net, decay=decay, use_warmup=warmup)
    ours = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}   # deepcopy at creation
    lerp = __import__('jax').jit(ema.lerp)
    for n in range(1, 40):
        with torch.no_grad():                                  # an "update": new weights of any size
            for p in net.parameters():
                p.add_(torch.from_numpy(rng.normal(0, 1, p.shape).astype(np.float32)))
        v3.update(net, step=n)
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}
        ours = lerp(ours, params, ema.weight_at(n, decay, warmup))
        for k, v in v3.module.state_dict().items():
            np.testing.assert_array_equal(np.asarray(ours[k]), v.numpy(), err_msg=f'{k} after update {n}')
    assert ema.decay_at(1, decay, warmup) == v3.get_decay(1) == 0.0            # the first update copies
    assert all(ema.decay_at(n, decay, warmup) == v3.get_decay(n) for n in range(1, 200))
    assert not np.allclose(np.asarray(ours['weight']), net.weight.detach().numpy())   # it averages
