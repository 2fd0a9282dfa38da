"""utils.model.loading: the BatchNorm that follows a layer, and its affine form."""
import torch
import torch.nn as nn

from tests.tiny_models import tiny_resnet, tiny_vgg
from utils.model.loading import batchnorm_affine, batchnorm_after


class ReluBetween(nn.Module):
    """conv -> in-place ReLU -> BatchNorm: the BatchNorm does not see the conv's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu_(self.conv(x))).mean(dim=(2, 3))


def test_batchnorm_after_finds_the_consumer_of_the_conv_output():
    m, x = tiny_resnet(), torch.rand(2, 3, 64, 64)
    assert batchnorm_after(m, m.conv3, x) is m.bn3
    assert batchnorm_after(m, m.conv1, x) is m.bn1
    vgg = tiny_vgg()
    assert batchnorm_after(vgg, vgg.features[3], torch.rand(1, 3, 224, 224)) is None
    r = ReluBetween().eval()
    assert batchnorm_after(r, r.conv, torch.rand(1, 3, 8, 8)) is None
    assert not m.conv3._forward_hooks and not m.bn3._forward_pre_hooks  # hooks removed


def test_batchnorm_affine_equals_the_module_in_eval_mode():
    m = tiny_resnet()
    scale, shift = batchnorm_affine(m.bn3)
    a = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    expected = m.bn3.double()(a)
    assert torch.allclose(scale[:, None, None] * a + shift[:, None, None], expected, atol=1e-12)
    assert (scale < 0).sum() == 0 and scale.shape == (16,)
