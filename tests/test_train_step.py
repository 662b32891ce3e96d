import copy

import numpy as np
import pytest
import torch

from loss import AAMsoftmax
from model import FbankAug, build_encoder
from trainECAPAModel import NonFiniteTraining, SpeakerModel, TrainingStep


def small_model(seed=0):
    torch.manual_seed(seed)
    return SpeakerModel(build_encoder('tdnn', 32, 16000, 16), AAMsoftmax(4, 0.2, 30, 16))


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(8, 4000, generator=generator), torch.arange(8) % 4


def run_step(model, optimizer_class=torch.optim.Adam, lr=1e-3, **options):
    optimizer = optimizer_class(model.parameters(), lr=lr)
    step = TrainingStep(model, optimizer, 'cpu', **options)
    torch.manual_seed(2)  # the same SpecAugment masks for every variant
    loss, accuracy, taken = step(batch(), np.random.default_rng(0))
    assert taken
    return step, loss


def parameter_change(before, after):
    with torch.no_grad():
        return float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after.parameters(), before.parameters()))))


def test_bf16_forward_is_close_to_float32_but_not_equal():
    _, full = run_step(small_model(), amp='off')
    _, mixed = run_step(small_model(), amp='bf16')
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() != full.item()
    assert mixed.item() == pytest.approx(full.item(), rel=0.05)


def test_fp16_uses_dynamic_loss_scaling_and_updates_the_weights():
    model = small_model()
    before = copy.deepcopy(model)
    step = TrainingStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), 'cpu', amp='fp16')
    initial_scale = step.scaler.get_scale()
    losses = [step(batch(), None)[0] for _ in range(20)]
    # Steps whose fp16 gradients overflow are skipped and halve the scale; the others update the weights.
    assert step.scaler.is_enabled() and 1 < step.scaler.get_scale() < initial_scale
    assert all(torch.isfinite(loss) for loss in losses) and parameter_change(before, model) > 0
    assert losses[-1] < losses[0]


def test_gradient_clipping_bounds_the_update_norm():
    clip = 1e-3
    unclipped = small_model()
    run_step(unclipped, torch.optim.SGD, lr=1.0)
    assert parameter_change(small_model(), unclipped) > 10 * clip
    clipped = small_model()
    run_step(clipped, torch.optim.SGD, lr=1.0, grad_clip=clip)
    assert parameter_change(small_model(), clipped) == pytest.approx(clip, rel=1e-3)


def test_specaugment_masks_stay_within_their_widths():
    torch.manual_seed(0)
    features = torch.ones(64, 80, 200)
    masked = FbankAug()(features)
    zero_frames = (masked == 0).all(dim=1).sum(dim=1)
    zero_bins = (masked == 0).all(dim=2).sum(dim=1)
    assert zero_frames.max() <= 9 and zero_bins.max() <= 7
    assert zero_frames.float().mean() > 2 and zero_bins.float().mean() > 1
    assert ((masked == 0) == ((masked == 0).all(dim=1, keepdim=True) | (masked == 0).all(dim=2, keepdim=True))).all()


def test_a_step_with_non_finite_gradients_changes_nothing_and_too_many_in_a_row_stop_training():
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = TrainingStep(model, optimizer, 'cpu', max_bad_steps=3)
    step(batch(), None)
    weights, moments = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    waveforms, labels = batch()
    poisoned = waveforms.clone()
    poisoned[3, 100] = float('nan')
    for _ in range(2):
        loss, _, taken = step((poisoned, labels), None)
        assert not taken and not torch.isfinite(loss)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, equal_nan=False, msg=key)
    assert optimizer.state_dict()['state'][0]['step'] == moments['state'][0]['step']
    assert step(batch(), None)[2] and step.bad_in_a_row == 0  # a good step resets the count
    for _ in range(2):
        step((poisoned, labels), None)
    with pytest.raises(NonFiniteTraining, match='3 steps in a row'):
        step((poisoned, labels), None)
