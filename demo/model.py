"""The shapes demo's nets (demo/networks.py) under the names that ``--model demo.model:shapes_cnn`` and
``demo.model:shapes_resnet`` give them: stores, summaries and reports record these spec strings."""
from demo.networks import (NARROW, SHAPES_ARCHS as ARCHS, SHAPES_CLASSES as NUM_CLASSES, WIDTH,  # noqa: F401
                           Bottleneck, ShapesCNN, ShapesResNet, shapes_cnn, shapes_resnet)
