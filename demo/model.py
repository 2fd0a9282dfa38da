"""A small CNN for the shapes demo, reachable as ``--model demo.model:shapes_cnn``.

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

    def forward(self, x):
        return self.forward_downsampled(self.downsample(x))


def shapes_cnn():
    """The factory for ``--model demo.model:shapes_cnn`` (weights come from ``--weights FILE``)."""
    return ShapesCNN()
