"""demo/training.py: the one training loop of both demos, and the settings it restores; demo/networks.py: one
Bottleneck for both demos. (That the demos' trained weights are today's: the digests of tests/test_house_plan.py.)"""
import pytest
import torch
import torch.nn as nn

from demo import networks, training


@pytest.fixture
def settings():
    """The caller's thread count and deterministic setting, put back after the test."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield before
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1])


class TinyJob(training.Job):
    """A 3 -> 2 linear classifier on 10 fixed points; records the settings it ran under."""

    def __init__(self):
        self.seen, self.losses = [], []

    def prepare(self):
        self.seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        net = nn.Linear(3, 2)
        x = torch.arange(30, dtype=torch.float32).reshape(10, 3).sin()
        return net, net.parameters(), x, torch.arange(10) % 2

    def loss(self, net, x, y, gen):
        return nn.functional.cross_entropy(net(x + 0.1 * torch.rand(x.shape, generator=gen)), y)

    def epoch_done(self, net, epoch, loss, seconds):
        self.losses.append(loss)

    def finish(self, net, x, y):
        self.seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), net.training))
        return {k: v.clone() for k, v in net.state_dict().items()}


RECIPE = training.Recipe(epochs=3, batch_size=4, lr=0.05, weight_decay=0.01, pct_start=0.25)


def by_hand(seed):
    """RECIPE's training of TinyJob written out: the weights."""
    torch.manual_seed(seed)
    job = TinyJob()
    net, params, x, y = job.prepare()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=3 * 3, pct_start=0.25)
    for _ in range(3):
        order = torch.randperm(10, generator=gen)
        for i in (0, 4, 8):
            loss = job.loss(net, x[order[i:i + 4]], y[order[i:i + 4]], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.state_dict()


@pytest.mark.parametrize("deterministic_before", [False, True])
def test_train_is_the_loop_written_out_and_restores_the_settings(settings, deterministic_before):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(deterministic_before)
    job = TinyJob()
    weights = training.train(job, RECIPE, seed=5, threads=2)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (1, deterministic_before)
    assert job.seen == [(2, True), (2, True, False)]  # under the training settings, finished in eval mode
    assert len(job.losses) == 3
    expected = by_hand(5)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not torch.equal(weights["weight"], by_hand(6)["weight"])  # the seed matters


def test_settings_are_restored_when_training_fails(settings):
    class Failing(TinyJob):
        def loss(self, net, x, y, gen):
            raise ValueError("boom")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="boom"):
        training.train(Failing(), RECIPE, seed=0, threads=2)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (1, False)


def test_deterministic_keeps_warn_only(settings):
    torch.use_deterministic_algorithms(True, warn_only=True)
    with training.deterministic(1):
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


def test_one_bottleneck_projects_only_when_the_width_changes():
    shapes, fashion = networks.shapes_resnet(), networks.fashion_resnet16()
    assert type(shapes.block) is type(fashion.layer3[1]) is networks.Bottleneck
    assert isinstance(shapes.block.shortcut, nn.Sequential)            # 64 -> 4
    assert isinstance(fashion.layer3[0].shortcut, nn.Sequential)      # 64 -> 16
    assert isinstance(fashion.layer3[1].shortcut, nn.Identity)        # 16 -> 16
    # the layer of interest is the last Conv2d in module order in every net (the stage scripts' last_conv)
    for net in (networks.shapes_cnn(), shapes, fashion, networks.fashion_relu32()):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs[-1] is net.layer_of_interest
    x = torch.randn(2, 64, 7, 7)
    block = shapes.block.eval()
    assert torch.equal(block(x), block.output(x, block.layer_input(x)))
    assert torch.allclose(block(x), torch.relu(block.bn3(block.conv3(block.layer_input(x))) + block.shortcut(x)))
