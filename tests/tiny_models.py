"""Small models for the tests, reachable from the command line as --model tests.tiny_models:NAME."""
import torch
import torch.nn as nn


class TinyResNet(nn.Module):
    """A ResNet-style net: conv stem, one residual block (conv-bn-relu-conv-bn + skip), pooling, linear."""

    def __init__(self, num_classes=4, width=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 5, stride=4, padding=2, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn1(self.conv1(x)) + x)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TinyVGG(nn.Module):
    """VGG-style: convs with bias and ReLU, max pooling, a two-layer classifier."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 10, 3, stride=2, padding=2, dilation=2), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(10 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class GroupedNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, groups=3)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class Mixed(nn.Module):
    """conv -> grouped conv (groups 2) -> depthwise conv -> Linear on (N, H, W, C) -> tokens -> MLP on (N, T, C)
    -> mean over tokens -> Linear feature -> Linear logits."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pw = nn.Linear(12, 10)
        self.mlp = nn.Sequential(nn.Linear(10, 14), nn.GELU(), nn.Linear(14, 10))
        self.head = nn.Linear(10, 6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.grouped(torch.relu(self.stem(x)))))
        x = self.pw(self.dw(x).permute(0, 2, 3, 1))                  # (N, H, W, 10)
        t = x.flatten(1, 2)                                            # (N, T, 10)
        t = t + self.mlp(t)
        return self.fc(torch.tanh(self.head(t.mean(dim=1))))


def _randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def tiny_resnet():
    torch.manual_seed(0)
    return _randomize_bn(TinyResNet(), 1).eval()


def tiny_vgg():
    torch.manual_seed(0)
    return TinyVGG().eval()


def grouped_net():
    torch.manual_seed(0)
    return GroupedNet().eval()


def tiny_resnet_hooked():
    """tiny_resnet whose conv3 output is shifted by a forward hook: its layer is not the conv alone, so a
    split of conv3's filter cannot reproduce it (stage 3's exactness checks must fail)."""
    model = tiny_resnet()
    model.conv3.register_forward_hook(lambda module, inputs, output: output + 0.5)
    return model


def unseeded_resnet():
    """The tiny ResNet as a user's factory usually is: its weights drawn from torch's global generator, no seed
    of its own (the stages build it under a fixed seed, so every process gets the same weights)."""
    return _randomize_bn(TinyResNet(), 1).eval()


def own_rng_net():
    """A factory that draws its weights from a generator of its own, new on every call: never the same model."""
    import numpy as np
    model = TinyResNet()
    rng = np.random.default_rng()
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(rng.standard_normal(model.fc.weight.shape).astype("float32")))
    return model.eval()


def ten_outputs():
    """The tiny ResNet with 10 outputs (for class folders that do not fit its outputs)."""
    torch.manual_seed(0)
    return TinyResNet(num_classes=10).eval()


def mixed_net():
    """Every layer kind of utils.model.layer_view: grouped conv, depthwise conv, Linear over (N, H, W, C), MLP on
    (N, T, C), Linear head; BatchNorm statistics randomized."""
    torch.manual_seed(0)
    return _randomize_bn(Mixed(), 5).eval()
