"""Every network the demos train: the shapes demo's small CNN and its ResNet layout, and Fashion-MNIST's ResNet.

The stage scripts name them by their factories, ``--model demo.model:shapes_cnn`` (or ``shapes_resnet``) and
``--model demo.fashion_model:fashion_resnet16`` (or ``fashion_resnet32``, ``fashion_relu16``, ``fashion_relu32``):
those spec strings are written into the stores, summaries and reports, so ``demo/model.py`` and
``demo/fashion_model.py`` re-export the factories from here under their old names.

**The shapes nets** (``demo/run_demo.py``). Like the paper's layer (ResNet-50's last 1x1 conv), the layer of
interest is a 1x1 conv at the end of the net. It is narrow: 4 channels for 9 classes (3 colours x 3 textures).
Even a code with one channel per part (a colour or a texture) would need 6, so training has to let channels
serve several unrelated classes. The images come in at 224 x 224 (the paper's evaluation transform); a 4 x 4
average pool first brings them back to about the 56 x 56 pixels they were drawn at, and two strided convs
follow, which keeps the nets cheap on a CPU.

- ``shapes_cnn``: the layer ``conv_out`` has a bias and no BatchNorm after it, then ReLU, global average
  pooling and the linear classifier, so "channel c is used by class y" means what it says: the channel fires on
  the class's images and its classifier weight for the class is positive.
- ``shapes_resnet`` (``--arch resnet``): the same narrow layer where the paper's layer sits in ResNet-50
  (``layer4.2.conv3``): ``block.conv3``, the last 1x1 conv of a bottleneck block, followed by a BatchNorm, the
  residual add, ReLU, pooling and the classifier. Its input is the block's 64-channel 3x3 conv (after
  BatchNorm and ReLU), its output has 4 channels, bias-free as in ResNet. The block's input is wider than its
  output, so the skip is a projection (1x1 conv + BatchNorm). Here "channel c is used by class y" can also mean
  that the channel signals y by being *less* active (a BatchNorm weight can be negative, and the add and ReLU
  follow), which is what the stage-2 option ``--importance_sign positive_activation`` is about.

**The Fashion-MNIST net** (``demo/run_fashion.py``) takes the images the stage scripts give it: (N, 3, 28, 28),
three equal colour channels (the ImageFolder loader turns the grey PNGs into RGB), normalized with Fashion-MNIST's
mean and std. Its first step averages the three channels back into one (no parameters), so a feature
visualization optimizes a grey image. Then, ResNet-style (BatchNorm after every conv, ReLU after every add):

  stem     3x3 conv 1 -> 32                           28 x 28
  layer1   basic block 32 -> 32, stride 2             14 x 14
  layer2   basic block 32 -> 64, stride 2              7 x 7
  layer3   two bottleneck blocks 64 -> W, W -> W       7 x 7   (inner width 64)
  pool, linear W -> 10

The layer of interest is ``layer3.1.conv3``, the last 1x1 conv of the last bottleneck block, as the paper's
``layer4.2.conv3``: it is followed by ``bn3``, the identity residual add and ReLU (head ``bn``). The ``relu``
variant replaces the last block by a 1x1 conv with bias followed directly by ReLU (no BatchNorm, no residual),
as in ``shapes_cnn``. W is 16 or 32: fewer channels than there are ways to tell ten classes apart.

In every net the layer of interest is the last Conv2d in module order, so the stage scripts' default
``--layer_of_interest last_conv`` picks it (a projection shortcut is registered before the block's own convs).
Every net names its layer as ``layer_of_interest``; the shapes nets also give ``logits_and_layer_input`` of the
pooled images (their training uses both).
"""
import torch.nn as nn

SHAPES_CLASSES = 9
WIDTH = 64     # input channels of the shapes nets' layer of interest
NARROW = 4     # output channels of the shapes nets' layer of interest (fewer than the classes)
FASHION_CLASSES = 10
FASHION_LAYER = "layer3.1.conv3"


# ----------------------------------------------------------------------------- blocks
def conv_bn_relu(c_in, c_out, kernel, stride):
    """[conv (padding 1, no bias), BatchNorm, ReLU]: the shapes nets' stem layers."""
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


def shapes_stem(width):
    """The shapes nets' features: (N, 3, 56, 56) pooled images -> (N, width, 7, 7)."""
    return nn.Sequential(*conv_bn_relu(3, 24, 4, 2),          # 56 -> 28
                         *conv_bn_relu(24, 32, 3, 2),         # 28 -> 14
                         *conv_bn_relu(32, 48, 3, 1), nn.MaxPool2d(2),  # 14 -> 7
                         *conv_bn_relu(48, width, 3, 1))      # 7 x 7


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut(x), -> ReLU (shortcut: 1x1 conv + BN when the shape
    changes, registered first so that the block's own convs come last in module order)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1 1x1 -> BN -> ReLU -> conv2 3x3 -> BN -> ReLU -> conv3 1x1 -> bn3, + shortcut(x), -> ReLU (ResNet-50's
    block). The shortcut is the identity, or a 1x1 conv and a BatchNorm when the block changes the width; it is
    registered first, so that conv3 is the block's last Conv2d in module order."""

    def __init__(self, c_in, mid, c_out):
        super().__init__()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
                         if c_in != c_out else nn.Identity())
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def layer_input(self, x):
        """The input of conv3: (N, mid, H, W)."""
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    def output(self, x, conv3_input):
        """The block's output from its input ``x`` and conv3's input."""
        return self.relu(self.bn3(self.conv3(conv3_input)) + self.shortcut(x))

    def forward(self, x):
        return self.output(x, self.layer_input(x))


class ReluHead(nn.Module):
    """The ``relu`` variant's last block: the bottleneck's 1x1 -> 3x3 part, then a 1x1 ``conv3`` with bias and
    ReLU (no BatchNorm, no residual)."""

    def __init__(self, c_in, mid, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.conv3(out))


class Grey(nn.Module):
    """(N, 3, H, W) -> (N, 1, H, W): the mean of the colour channels (the images' three channels are equal)."""

    def forward(self, x):
        return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


# ----------------------------------------------------------------------------- the shapes nets
class ShapesCNN(nn.Module):
    """The stem, then ``conv_out`` (1x1, with a bias), ReLU, pooling, the classifier."""

    def __init__(self, num_classes=SHAPES_CLASSES, width=WIDTH, narrow=NARROW):
        super().__init__()
        self.downsample = nn.AvgPool2d(4)  # 224 -> 56, no parameters
        self.features = shapes_stem(width)  # 7 x 7, the layer's input
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


class ShapesResNet(nn.Module):
    """The shapes CNN's stem, then one bottleneck block whose narrow last conv ``block.conv3`` is the layer."""

    def __init__(self, num_classes=SHAPES_CLASSES, width=WIDTH, narrow=NARROW):
        super().__init__()
        self.downsample = nn.AvgPool2d(4)  # 224 -> 56, no parameters
        self.features = shapes_stem(width)  # 7 x 7, the block's input
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


def shapes_cnn():
    """The factory for ``--model demo.model:shapes_cnn`` (weights come from ``--weights FILE``)."""
    return ShapesCNN()


def shapes_resnet():
    """The factory for ``--model demo.model:shapes_resnet`` (weights come from ``--weights FILE``)."""
    return ShapesResNet()


SHAPES_ARCHS = {"cnn": shapes_cnn, "resnet": shapes_resnet}  # demo/run_demo.py --arch
SHAPES_SPECS = {"cnn": "demo.model:shapes_cnn", "resnet": "demo.model:shapes_resnet"}  # their --model


# ----------------------------------------------------------------------------- the Fashion-MNIST net
class FashionResNet(nn.Module):
    def __init__(self, width=16, head="bn", num_classes=FASHION_CLASSES, mid=64):
        super().__init__()
        if head not in ("bn", "relu"):
            raise ValueError(f"head {head!r}: 'bn' or 'relu'")
        self.grey = Grey()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = BasicBlock(32, 32, stride=2)
        self.layer2 = BasicBlock(32, 64, stride=2)
        last = Bottleneck(width, mid, width) if head == "bn" else ReluHead(width, mid, width)
        self.layer3 = nn.Sequential(Bottleneck(64, mid, width), last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    @property
    def layer_of_interest(self):
        return self.layer3[1].conv3

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(self.grey(x)))))
        return self.fc(self.pool(x).flatten(1))


def fashion_resnet16():
    """``--model demo.fashion_model:fashion_resnet16``: layer of interest layer3.1.conv3, 16 channels, BN + add."""
    return FashionResNet(16, "bn")


def fashion_resnet32():
    """``--model demo.fashion_model:fashion_resnet32``: as fashion_resnet16 with 32 channels."""
    return FashionResNet(32, "bn")


def fashion_relu16():
    """``--model demo.fashion_model:fashion_relu16``: layer3.1.conv3 (16 channels, bias) followed by ReLU."""
    return FashionResNet(16, "relu")


def fashion_relu32():
    """``--model demo.fashion_model:fashion_relu32``: as fashion_relu16 with 32 channels."""
    return FashionResNet(32, "relu")


FASHION_ARCHS = {f.__name__: f for f in (fashion_resnet16, fashion_resnet32, fashion_relu16, fashion_relu32)}


def fashion_spec(arch):
    """The ``--model`` of a Fashion-MNIST net: ``demo.fashion_model:{arch}``."""
    return f"demo.fashion_model:{arch}"
