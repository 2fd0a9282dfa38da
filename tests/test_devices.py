"""Device choice of every stage script (utils.run.device.select_device), on a CPU-only machine with CUDA faked:
under torchrun each process takes the card of its LOCAL_RANK, explicit cards are refused there, the chosen
card is made current with torch.cuda.set_device (never card 0 when another card was asked for), and bad
requests are one-line UserErrors."""
import argparse
import ast
import os
import re
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from utils.run import cli
from utils.run import context
from utils.run import device as device_choice

STAGE_SCRIPTS = ("get_importances_for_classes.py", "get_cosine_similarities.py", "disentangle_channel.py",
                 "get_results.py")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend ``count`` CUDA cards exist (0: no CUDA); returns the list of torch.cuda.set_device calls."""
    calls = []

    def install(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
        return calls

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return install


def test_bare_cuda_under_torchrun_is_the_local_rank_card(fake_cuda):
    calls = fake_cuda(8)
    for local_rank in range(8):
        assert device_choice.select_device("cuda", None, local_rank, 8) == torch.device("cuda", local_rank)
        assert device_choice.select_device(None, None, local_rank, 8) == torch.device("cuda", local_rank)
    assert calls == [r for r in range(8) for _ in range(2)]


def test_torchrun_environment_is_read_when_not_given(fake_cuda, monkeypatch):
    calls = fake_cuda(4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")  # second node: global rank 6, local rank 2
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device_choice.select_device(None, None) == torch.device("cuda", 2) and calls == [2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more processes on the node than cards: every rank refuses
    with pytest.raises(cli.UserError, match="--nproc_per_node 4"):
        device_choice.select_device(None, None)
    assert calls == [2]


@pytest.mark.parametrize("device, gpu, words", [
    ("cuda:3", None, ("--device cuda:3", "2 processes", "every process on card 3", "--device cuda")),
    ("cuda:0", None, ("--device cuda:0", "every process on card 0")),
    ("cuda", 3, ("--gpu 3", "every process on card 3", "leave --gpu out")),
    (None, 0, ("--gpu 0", "every process on card 0")),
])
def test_one_card_for_all_processes_is_refused(fake_cuda, device, gpu, words):
    calls = fake_cuda(8)
    with pytest.raises(cli.UserError) as e:
        device_choice.select_device(device, gpu, 1, 2)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert calls == []


def test_local_rank_without_its_own_card_is_refused(fake_cuda):
    calls = fake_cuda(2)
    assert device_choice.select_device("cuda", None, 1, 4) == torch.device("cuda", 1)
    with pytest.raises(cli.UserError, match=r"LOCAL_RANK 2 has no CUDA card.*--nproc_per_node 2"):
        device_choice.select_device("cuda", None, 2, 4)
    assert calls == [1]


@pytest.mark.parametrize("device, gpu", [(None, 3), ("cuda", 3), ("cuda:3", None), ("cuda:3", 3)])
def test_single_process_card_3_sets_card_3_never_0(fake_cuda, device, gpu):
    calls = fake_cuda(4)
    assert device_choice.select_device(device, gpu, 0, 1) == torch.device("cuda", 3)
    assert calls == [3]


def test_single_process_defaults(fake_cuda):
    calls = fake_cuda(2)
    assert device_choice.select_device(None, None, 0, 1) == torch.device("cuda", 0)
    assert device_choice.select_device("cuda", None, 0, 1) == torch.device("cuda", 0)
    assert device_choice.select_device("cpu", 1, 0, 1) == torch.device("cpu")  # --gpu is ignored on the CPU
    assert device_choice.select_device("cpu", None, 3, 8) == torch.device("cpu")  # torchrun on CPU (gloo)
    assert calls == [0, 0]


def test_without_cuda(fake_cuda):
    calls = fake_cuda(0)
    assert device_choice.select_device(None, None, 0, 1) == torch.device("cpu")
    assert device_choice.select_device(None, 3, 0, 1) == torch.device("cpu")  # published --gpu on a CPU machine
    assert device_choice.select_device(None, None, 1, 2) == torch.device("cpu")
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(cli.UserError, match=f"--device {device}: CUDA is not available.*--device cpu"):
            device_choice.select_device(device, None, 0, 1)
    assert calls == []


@pytest.mark.parametrize("device, gpu, words", [
    ("cuda:4", None, ("CUDA card 4 does not exist", "4 visible", "0..3")),
    ("cuda", 7, ("CUDA card 7 does not exist",)),
    (None, 4, ("CUDA card 4 does not exist",)),
    ("cuda:1", 2, ("--device cuda:1 and --gpu 2", "different cards")),
    (None, -1, ("--gpu -1",)),
    ("gpu", None, ("--device gpu", "cpu, cuda or cuda:N")),
    ("cuda:x", None, ("--device cuda:x",)),
])
def test_bad_requests_are_one_line_errors(fake_cuda, device, gpu, words):
    calls = fake_cuda(4)
    with pytest.raises(cli.UserError) as e:
        device_choice.select_device(device, gpu, 0, 1)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert calls == []


def test_gpu_flag_default_is_unset():
    args = cli.add_model_args(argparse.ArgumentParser()).parse_args(["--data_dir", "d", "--store_dir", "s"])
    assert args.gpu is None and args.device is None
    args = cli.add_model_args(argparse.ArgumentParser()).parse_args(
        ["--data_dir", "d", "--store_dir", "s", "--gpu", "3"])
    assert args.gpu == 3


def test_context_setup_uses_the_choice(fake_cuda, monkeypatch):
    """The path every stage script takes: context.setup -> select_device, card made current first."""
    calls = fake_cuda(4)
    args = SimpleNamespace(device=None, gpu=3, model="tests.tiny_models:tiny_resnet", weights=None,
                           layer_of_interest="last_conv", nr_channels_in_layer_of_interest=None, batch_size=4)
    ctx = context.setup(args, need_data=False)
    assert ctx.device == torch.device("cuda", 3) and calls == [3]


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_stage_scripts_choose_the_device_through_context_setup(script):
    with open(os.path.join(ROOT, script)) as f:
        src = f.read()
    assert "context.setup(" in src
    assert "select_device" not in src and not re.search(r"args\.(gpu|device)\b", src)


def unindexed_cuda_calls(source):
    """Line numbers of ``x.cuda()``, ``torch.device("cuda")`` and ``...(device="cuda")`` calls in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        args = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if name == "cuda" and not node.args and not node.keywords:
            lines.append(node.lineno)
        elif name == "device" and args[:1] == ["cuda"] and len(node.args) == 1:
            lines.append(node.lineno)
        elif any(k.arg == "device" and isinstance(k.value, ast.Constant) and k.value.value == "cuda"
                 for k in node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_code_scan_finds_what_it_looks_for():
    src = 'x.cuda()\ntorch.device("cuda")\ntorch.zeros(3, device="cuda")\nx.cuda(3)\ntorch.device("cuda", 1)\n'
    assert unindexed_cuda_calls(src) == [1, 2, 3]


def test_no_unindexed_cuda_device_in_the_code():
    """Nothing picks card 0 behind the user's back: no ``.cuda()``, no ``torch.device("cuda")`` without an
    index, no ``device="cuda"`` in the package or the stage scripts."""
    files = [os.path.join(ROOT, s) for s in STAGE_SCRIPTS]
    files += sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "utils")) for f in fs
                    if f.endswith(".py"))
    assert len(files) > 40  # every module of the package, sub-packages included
    hits = []
    for path in files:
        with open(path) as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{n}" for n in unindexed_cuda_calls(f.read())]
    assert hits == []
