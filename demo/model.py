"""Small CNNs for the shapes demo: ``--model demo.model:shapes_cnn`` and ``demo.model:shapes_resnet``.

Like the paper's layer (ResNet-50's last 1x1 conv), the layer of interest ``conv_out`` is a 1x1
conv at the end of the net, followed by ReLU, global average pooling and the linear classifier.
It is narrow: 4 channels for 9 classes (3 colours x 3 textures). Even a code with one channel per
part (a colour or a texture) would need 6, so training has to let channels serve several unrelated
classes. It is the last Conv2d, so the stage scripts' default ``--layer_of_interest last_conv``
picks it. It has a bias and no BatchNorm after it, so "channel c is used by class y" means what it
says: the channel fires on the class's images and its classifier weight for the class is positive.

The images come in at 224 x 224 (the paper's evaluation transform); a 4 x 4 average pool first
brings them back to about the 56 x 56 pixels they were drawn at, and two strided convs follow,
which keeps the net cheap on a CPU.

``shapes_resnet`` (``demo/run_demo.py --arch resnet``) puts the same narrow layer where the paper's
layer sits in ResNet-50 (``layer4.2.conv3``): the last 1x1 conv of a bottleneck-style block, followed
by a BatchNorm, the residual add, ReLU, pooling and the classifier. Its input is the block's
64-channel 3x3 conv (after BatchNorm and ReLU), its output has 4 channels, bias-free as in ResNet.
The block's input is wider than its output, so the skip is a projection (1x1 conv + BatchNorm, as in
the first block of a ResNet stage) rather than the identity. Here "channel c is used by class y" can
also mean that the channel signals y by being *less* active (a BatchNorm weight can be negative, and
the add and ReLU follow), which is what the stage-2 option ``--importance_sign positive_activation``
is about.
"""
import torch.nn as nn

NUM_CLASSES = 9
WIDTH = 64     # input channels of the layer of interest
NARROW = 4     # output channels of the layer of interest (fewer than the classes)


def _conv(c_in, c_out, kernel, stride):
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class ShapesCNN(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES, width=WIDTH, narrow=NARROW):
        super().__init__()
        self.downsample = nn.AvgPool2d(4)  # 224 -> 56, no parameters
        self.features = nn.Sequential(*_conv(3, 24, 4, 2),          # 56 -> 28
                                      *_conv(24, 32, 3, 2),         # 28 -> 14
                                      *_conv(32, 48, 3, 1), nn.MaxPool2d(2),  # 14 -> 7
                                      *_conv(48, width, 3, 1))      # 7 x 7, the layer's input
        self.conv_out = nn.Conv2d(width, narrow, 1)   # the layer of interest (with a bias, no BatchNorm after it)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(narrow, num_classes)

    def head(self, features):
        """Logits from the layer's input (the output of ``features``)."""
        return self.fc(self.pool(self.relu(self.conv_out(features))).flatten(1))

    def forward_downsampled(self, x):
        """The net after its parameter-free 4 x 4 average pool (training caches the pooled images)."""
        return self.head(self.features(x))

    @property
    def layer_of_interest(self):
        return self.conv_out

    def logits_and_layer_input(self, x):
        """(logits, input of the layer of interest) from the pooled images (training uses both)."""
        features = self.features(x)
        return self.head(features), features

    def forward(self, x):
        return self.forward_downsampled(self.downsample(x))


def shapes_cnn():
    """The factory for ``--model demo.model:shapes_cnn`` (weights come from ``--weights FILE``)."""
    return ShapesCNN()


class Bottleneck(nn.Module):
    """conv1 1x1 -> BN -> ReLU -> conv2 3x3 -> BN -> ReLU -> conv3 1x1 -> bn3, + shortcut(x), -> ReLU.

    The shortcut (a 1x1 conv and a BatchNorm: the block changes the width) is registered first, so that
    conv3 is the block's, and the net's, last Conv2d in module order (the stage scripts' ``last_conv``).
    """

    def __init__(self, c_in, mid, c_out):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)  # the layer of interest
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def layer_input(self, x):
        """The input of conv3: (N, mid, H, W)."""
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    def output(self, x, conv3_input):
        return self.relu(self.bn3(self.conv3(conv3_input)) + self.shortcut(x))

    def forward(self, x):
        return self.output(x, self.layer_input(x))


class ShapesResNet(nn.Module):
    """The demo CNN's stem, then one bottleneck block whose narrow last conv ``block.conv3`` is the layer."""

    def __init__(self, num_classes=NUM_CLASSES, width=WIDTH, narrow=NARROW):
        super().__init__()
        self.downsample = nn.AvgPool2d(4)  # 224 -> 56, no parameters
        self.features = nn.Sequential(*_conv(3, 24, 4, 2),          # 56 -> 28
                                      *_conv(24, 32, 3, 2),         # 28 -> 14
                                      *_conv(32, 48, 3, 1), nn.MaxPool2d(2),  # 14 -> 7
                                      *_conv(48, width, 3, 1))      # 7 x 7, the block's input
        self.block = Bottleneck(width, width, narrow)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(narrow, num_classes)

    @property
    def layer_of_interest(self):
        return self.block.conv3

    def logits_and_layer_input(self, x):
        """(logits, input of the layer of interest) from the pooled images (training uses both)."""
        features = self.features(x)
        layer_input = self.block.layer_input(features)
        out = self.block.output(features, layer_input)
        return self.fc(self.pool(out).flatten(1)), layer_input

    def forward_downsampled(self, x):
        return self.logits_and_layer_input(x)[0]

    def forward(self, x):
        return self.forward_downsampled(self.downsample(x))


def shapes_resnet():
    """The factory for ``--model demo.model:shapes_resnet`` (weights come from ``--weights FILE``)."""
    return ShapesResNet()


ARCHS = {"cnn": shapes_cnn, "resnet": shapes_resnet}  # demo/run_demo.py --arch, demo/train.py --arch
