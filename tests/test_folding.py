"""Batch norm folded into its convolution (``embed.folding``): the same function, found on the forward pass."""

import pytest
import timm
import torch
from torch import nn

from pinterest_cls.embed.folding import fold_batchnorm, folded


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with batch norm statistics and affines far from the identity of a fresh model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_every_batch_norm_of_a_timm_cnn_folds_and_the_features_stay_within_rounding(name):
    torch.manual_seed(0)
    model = trained_looking(timm.create_model(name, pretrained=False, num_classes=0))
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(x)
    n = batch_norms(model)
    fast = folded(model, x[:1])
    assert n > 0 and batch_norms(fast) == 0  # timm's BatchNormAct2d (efficientnet) and nn.BatchNorm2d (resnet)
    assert batch_norms(model) == n  # the model given is left as it is
    with torch.inference_mode():
        after, again = fast(x), model(x)
    assert torch.equal(again, before)
    assert not torch.equal(after, before)  # another computation, not the same one
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    assert nn.functional.cosine_similarity(after, before).min() > 0.99999


class Shared(nn.Module):
    """A convolution whose output the batch norm reads, and a residual sum reads too."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.conv, self.bn, self.inplace = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), inplace

    def forward(self, x):
        y = self.conv(x)
        if self.inplace:  # changed in place before the batch norm reads it: the same tensor, another value
            return self.bn(y.mul_(2))
        return self.bn(y) + y


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_convolution_output_used_by_more_than_its_batch_norm_is_not_folded(inplace):
    model = trained_looking(Shared(inplace))
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        before = model(x)
    assert folded(model, x) is model  # nothing to fold: no copy
    assert fold_batchnorm(model, x) == 0 and batch_norms(model) == 1
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    plain = trained_looking(Plain())
    with torch.inference_mode():
        want = plain(x)
    assert fold_batchnorm(plain, x) == 1 and batch_norms(plain) == 0  # the same pair, used only by it
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        folded(Plain().train(), torch.rand(1, 3, 8, 8))
