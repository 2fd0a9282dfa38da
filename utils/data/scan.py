"""One scan over images: batches of a data set through the model up to a layer, with what a pass needs.

Every pass of stages 3 and 4 and of the feature visualizations and the SAE view is the same loop: a loader
over explicit batches of dataset indices (``folders.make_loader``; unreadable images stop the pass, are skipped
or kept, as asked), the images moved to the device, a forward through ``utils.model.tap`` up to the layer, and
the batch's numbers collected. ``scan`` is that loop; it yields a ``ScanBatch`` per batch and leaves the
indices of skipped images in ``Scan.skipped``. How a pass reads its images (the data set, batch size, device,
loader workers, what to do with an unreadable file, the model outputs of the classes, channels-last) is one
``ScanPlan``, built once by the stage and handed to each of its passes; which images a pass reads is its own.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils.data import folders
from utils.model import tap

# what a pass asks of the forward: the layer's input, its input and output, or (with the logits' backward)
# the gradient of each image's label logit at the layer's output
INPUT, INPUT_OUTPUT, GRADIENT = "input", "input_output", "gradient"


@dataclass(frozen=True, eq=False)
class ScanPlan:
    """How a pass reads images (all but which): ``dataset`` (an ImageFolder-like data set with ``targets``),
    ``batch_size`` images per batch (``batches``), the ``device`` the images go to, ``num_workers`` loader
    processes, ``unreadable`` 'error', 'skip' or 'keep' and ``hint`` (the text added to the one-line error), as
    ``folders.make_loader``; ``class_outputs``: (K,) int64 output index of each class folder
    (``utils.data.classmap``; None: folder y is output y), whose logit a GRADIENT scan differentiates;
    ``channels_last``: the images go in channels-last (the model must have been converted by the caller)."""
    dataset: object
    batch_size: int = 1
    device: object = "cpu"
    num_workers: int = 0
    unreadable: str = "error"
    hint: str = ""
    class_outputs: object = None
    channels_last: bool = False

    def batches(self, indices):
        """``indices`` in consecutive batches of ``batch_size``: [[index, ...], ...]."""
        return folders.batches_of(indices, self.batch_size)


@dataclass
class ScanBatch:
    """One batch of a scan. labels (B,) as loaded; indices (B,) int64: the dataset index of each image;
    x (B, C_in, H, W) float32: the layer's input; a (B, C_out, H', W'): its output (INPUT_OUTPUT, GRADIENT);
    g (like a): the gradient of each image's class logit (GRADIENT)."""
    labels: torch.Tensor
    indices: torch.Tensor
    x: torch.Tensor
    a: torch.Tensor = None
    g: torch.Tensor = None


class Scan:
    """Iterable of ``ScanBatch`` (see ``scan``); ``skipped``: dataset indices of the images left out as
    unreadable, complete once the loop has ended; ``kept(indices)``: ``indices`` less those."""

    def __init__(self, model, layer, loader, device, what, outputs, channels_last, desc):
        self.model, self.layer, self.loader, self.device = model, layer, loader, device
        self.what, self.outputs, self.channels_last, self.desc = what, outputs, channels_last, desc

    @property
    def skipped(self):
        return self.loader.skipped

    def kept(self, indices):
        skipped = set(self.loader.skipped)
        return [i for i in indices if i not in skipped]

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = self.loader.indexed()
        if self.desc is not None:
            batches = tqdm(batches, total=len(self.loader), desc=self.desc, unit="batch", dynamic_ncols=True)
        for images, labels, indices in batches:
            yield self.forward(images.to(self.device, non_blocking=True), labels, indices)

    def forward(self, images, labels, indices):
        """The ScanBatch of one loaded batch."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.what == GRADIENT:
            logit_of = labels if self.outputs is None else self.outputs[labels]  # each image's class's output
            x, a, g, _ = tap.logits_and_layer_grad(self.model, self.layer, images,
                                                   logit_of.to(self.device, non_blocking=True))
            return ScanBatch(labels, indices, x.float(), a, g)
        if self.what == INPUT_OUTPUT:
            x, a = tap.layer_input_output(self.model, self.layer, images)
            return ScanBatch(labels, indices, x.float(), a)
        return ScanBatch(labels, indices, tap.layer_input(self.model, self.layer, images).float())


def scan(model, layer, plan, batches, what=INPUT, desc=None):
    """The images of ``batches`` (lists of dataset indices of ``plan.dataset``) through ``model`` up to ``layer``,
    read as ``plan`` (a ``ScanPlan``) says.

    what: INPUT, INPUT_OUTPUT or GRADIENT (see ScanBatch); desc: the progress bar's text (None: no bar).
    Returns a ``Scan``: per batch a ``ScanBatch`` (labels (B,), indices (B,), x (B, C_in, H, W), a and g
    (B, C_out, H', W') as ``what`` asks).
    """
    loader = folders.make_loader(plan.dataset, batches, plan.num_workers, plan.device, plan.unreadable, plan.hint)
    outputs = plan.class_outputs
    return Scan(model, layer, loader, plan.device, what,
                None if outputs is None else torch.as_tensor(outputs, dtype=torch.int64), plan.channels_last, desc)
