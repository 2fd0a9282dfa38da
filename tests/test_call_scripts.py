"""The two call scripts: the paper's 20 triples, folders from arguments or environment, stop at first failure."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_stage

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out

PAPER_TRIPLES = [(522, 62, 687), (1404, 385, 834), (895, 631, 946), (242, 515, 619), (522, 61, 687),
                 (1660, 530, 938), (242, 515, 846), (242, 619, 808), (895, 467, 946), (242, 808, 846),
                 (1349, 27, 889), (1832, 852, 984), (1773, 791, 958), (1349, 27, 486), (1698, 57, 515),
                 (1698, 57, 808), (1698, 58, 515), (1698, 58, 808), (1698, 53, 515), (1698, 53, 808)]


def fake_python(tmp_path, fail_on_call=None):
    """A stand-in for python that logs its arguments, one line per call, and fails on call N if asked."""
    log = tmp_path / "calls.log"
    script = tmp_path / "fakepython"
    fail = f'[ "$(wc -l < {log})" -eq {fail_on_call} ] && exit 3' if fail_on_call else ""
    script.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n{fail}\nexit 0\n')
    script.chmod(0o755)
    log.write_text("")
    return str(script), log


def flag(line, name):
    return re.search(rf"--{name} (\S+)", line).group(1)


def run(script, args, env):
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], env=dict(os.environ, **env),
                          capture_output=True, text=True)


def paper_flags_absent(call):
    return "--nr_channels_in_layer_of_interest" not in call and "--layer_of_interest" not in call


def test_disentanglement_calls_run_every_triple_in_one_process(tmp_path):
    py, log = fake_python(tmp_path)
    proc = run("disentanglement_calls.sh", ["/d", "/s", "--device", "cpu"], {"PYTHON": py})
    assert proc.returncode == 0, proc.stderr
    (call,) = log.read_text().splitlines()
    assert call.split()[0].endswith("disentangle_channel.py")
    assert flag(call, "triples") == os.path.join(ROOT, "paper_triples.txt")
    assert flag(call, "data_dir") == "/d" and flag(call, "store_dir") == "/s" and flag(call, "model") == "resnet50"
    assert flag(call, "nr_channels_in_layer_of_interest") == "2048" and flag(call, "layer_of_interest") == "layer4.2.conv3"
    assert "--channel_disentangle" not in call and call.endswith("--device cpu")


def test_quantitative_calls_run_every_triple_in_one_process(tmp_path):
    py, log = fake_python(tmp_path)
    proc = run("quantitative_evaluation_calls.sh", [], {"PYTHON": py, "DATA_DIR": "/d", "STORE_DIR": "/s",
                                                         "OUT_DIR": "/o"})
    assert proc.returncode == 0, proc.stderr
    (call,) = log.read_text().splitlines()
    assert call.split()[0].endswith("get_results.py") and flag(call, "triples").endswith("paper_triples.txt")
    assert flag(call, "proportion_attribution_required") == "0.03" and "--get_quantitative" in call
    assert flag(call, "model_dir") == "/s" and flag(call, "out_dir") == "/o"
    assert flag(call, "layer_of_interest") == "layer4.2.conv3" and flag(call, "nr_channels_in_layer_of_interest") == "2048"
    assert "means_required0.03.txt" in proc.stdout


def test_per_triple_loop_runs_the_20_triples(tmp_path):
    for script, channel_flag in (("disentanglement_calls.sh", "channel_disentangle"),
                                 ("quantitative_evaluation_calls.sh", "channel_of_interest")):
        py, log = fake_python(tmp_path)
        proc = run(script, ["/d", "/s", "--device", "cpu"], {"PYTHON": py, "PER_TRIPLE": "1", "OUT_DIR": "/o"})
        assert proc.returncode == 0, proc.stderr
        calls = log.read_text().splitlines()
        got = [(int(flag(c, channel_flag)), int(flag(c, "classes_for_concept1")),
                int(flag(c, "classes_for_concept2"))) for c in calls]
        assert got == PAPER_TRIPLES
        for c in calls:
            assert flag(c, "data_dir") == "/d" and flag(c, "model") == "resnet50" and "--triples" not in c
            assert flag(c, "nr_channels_in_layer_of_interest") == "2048" and c.endswith("--device cpu")
            assert flag(c, "layer_of_interest") == "layer4.2.conv3"
        if channel_flag == "channel_of_interest":
            assert all(flag(c, "proportion_attribution_required") == "0.03" and flag(c, "model_dir") == "/s"
                       and flag(c, "out_dir") == "/o" for c in calls)


def test_per_triple_loop_reads_comments_and_several_classes(tmp_path):
    triples = tmp_path / "mine.txt"
    triples.write_text("# mine\n3 0,2 1   # two classes in concept 1\n\n  5 1 3\n")
    py, log = fake_python(tmp_path)
    proc = run("disentanglement_calls.sh", ["/d", "/s"], {"PYTHON": py, "PER_TRIPLE": "1", "TRIPLES": str(triples)})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [(flag(c, "channel_disentangle"), flag(c, "classes_for_concept1"), flag(c, "classes_for_concept2"))
            for c in calls] == [("3", "0,2", "1"), ("5", "1", "3")]
    assert all(c.endswith("--classes_for_concept2 " + c2) for c, c2 in zip(calls, ("1", "3")))


@pytest.mark.parametrize("per_triple", ["0", "1"])
@pytest.mark.parametrize("model_args", [["--model", "pkg.mod:make", "--weights", "w.pth"], ["--model=resnet18"],
                                        ["--layer_of_interest", "layer3.5.conv3"]])
def test_paper_layer_flags_only_for_the_papers_model(tmp_path, per_triple, model_args):
    """A user's model (or the paper's model with another layer) gets none of the paper's layer flags."""
    triples = tmp_path / "mine.txt"
    triples.write_text("3 0 1\n")
    for script in ("disentanglement_calls.sh", "quantitative_evaluation_calls.sh"):
        py, log = fake_python(tmp_path)
        proc = run(script, ["/d", "/s", *model_args], {"PYTHON": py, "PER_TRIPLE": per_triple,
                                                       "TRIPLES": str(triples), "OUT_DIR": "/o"})
        assert proc.returncode == 0, proc.stderr
        (call,) = log.read_text().splitlines()
        assert call.endswith(" ".join(model_args))
        if "--layer_of_interest" in model_args:
            assert "--nr_channels_in_layer_of_interest" not in call and call.count("--layer_of_interest") == 1
        else:
            assert paper_flags_absent(call)
            assert flag(call, "model") == (model_args[1] if len(model_args) > 1 else "resnet18")


def test_call_scripts_stop_at_first_failure(tmp_path):
    for script in ("disentanglement_calls.sh", "quantitative_evaluation_calls.sh"):
        py, log = fake_python(tmp_path, fail_on_call=3)
        proc = run(script, ["/d", "/s"], {"PYTHON": py, "PER_TRIPLE": "1"})
        assert proc.returncode == 3
        assert len(log.read_text().splitlines()) == 3
        assert proc.stdout.count("===") == 3
        py, log = fake_python(tmp_path, fail_on_call=1)
        proc = run(script, ["/d", "/s"], {"PYTHON": py})
        assert proc.returncode == 3 and len(log.read_text().splitlines()) == 1
        assert "column means" not in proc.stdout


def test_call_scripts_need_the_folders_and_the_triples_file(tmp_path):
    py, log = fake_python(tmp_path)
    env = {"PYTHON": py, "DATA_DIR": "", "STORE_DIR": "", "MODEL_DIR": ""}
    for script in ("disentanglement_calls.sh", "quantitative_evaluation_calls.sh"):
        proc = run(script, [], env)
        assert proc.returncode != 0 and "DATA_DIR" in proc.stderr
        proc = run(script, ["/d", "/s"], {"PYTHON": py, "TRIPLES": str(tmp_path / "none.txt")})
        assert proc.returncode == 2 and "no triples file" in proc.stderr
        assert log.read_text() == ""


@pytest.fixture(scope="module")
def tiny_store(image_root, tmp_path_factory):
    """Stage 1 of the tiny ResNet on the session's images (batches of 4), once: each test works on a copy."""
    store = str(tmp_path_factory.mktemp("call_scripts") / "store")
    run_stage("get_importances_for_classes.py", "--data_dir", image_root, "--store_dir", store, "--model",
              "tests.tiny_models:tiny_resnet", "--batch_size", "4", "--num_workers", "0", "--device", "cpu")
    return store


def test_call_scripts_on_a_generated_model(image_root, tiny_store, tmp_path):
    """As a new user with their own model: TRIPLES=mine.txt bash disentanglement_calls.sh DATA STORE --model
    pkg.mod:factory, then the quantitative script; the real stage scripts run (one process each)."""
    store, out = shutil.copytree(tiny_store, str(tmp_path / "store")), str(tmp_path / "out")
    model = ["--model", "tests.tiny_models:tiny_resnet", "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
    triples = tmp_path / "mine.txt"
    triples.write_text("1 0 1\n5 2 3\n7 0,2 1\n")
    env = {"PYTHON": sys.executable, "TRIPLES": str(triples), "OUT_DIR": out,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    s3 = run("disentanglement_calls.sh", [image_root, store, *model], env)
    assert s3.returncode == 0, s3.stdout + s3.stderr
    assert s3.stdout.count("OK, same function") == 3
    assert len(os.listdir(os.path.join(store, "models_disentangled"))) == 3 * 23
    s4 = run("quantitative_evaluation_calls.sh", [image_root, store, *model], env)
    assert s4.returncode == 0, s4.stdout + s4.stderr
    means = open(os.path.join(out, "results_quantitative", "means_required0.03.txt")).read().splitlines()
    assert len(means) == 1 + 2 * 3 + 2 and means[-1].startswith("ALL,2,")


def logging_program(path, log, name):
    """An executable at ``path`` that writes '``name`` ARGS' to ``log`` and succeeds."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f'#!/usr/bin/env bash\necho "{name} $@" >> {log}\nexit 0\n')
    os.chmod(path, 0o755)


@pytest.mark.parametrize("script", ["disentanglement_calls.sh", "quantitative_evaluation_calls.sh"])
def test_call_scripts_choose_the_interpreter(tmp_path, script):
    """$PYTHON, else the .venv/bin/python next to the script, else python3; never a bare 'python' (which, in a
    shell with the project's .venv not activated, is another interpreter)."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    logging_program(str(bin_dir / "python"), log, "bare-python")
    logging_program(str(bin_dir / "python3"), log, "python3")
    here = tmp_path / "checkout"
    here.mkdir()
    for name in (script, os.path.join("utils", "run", "call_flags.sh")):  # the script and the flags it sources
        os.makedirs(os.path.dirname(here / name), exist_ok=True)
        with open(os.path.join(ROOT, name)) as src:
            (here / name).write_text(src.read())
    (here / "paper_triples.txt").write_text("3 0 1\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": ""}

    def first_word():
        words = log.read_text().split()
        log.write_text("")
        return words[0] if words else None
    log.write_text("")
    proc = subprocess.run(["bash", str(here / script), "/d", "/s"], env=dict(os.environ, **env), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert first_word() == "python3"  # no .venv next to the script
    logging_program(str(here / ".venv" / "bin" / "python"), log, "venv-python")
    subprocess.run(["bash", str(here / script), "/d", "/s"], env=dict(os.environ, **env), check=True)
    assert first_word() == "venv-python"
    logging_program(str(tmp_path / "mine"), log, "mine")
    subprocess.run(["bash", str(here / script), "/d", "/s"], env=dict(os.environ, **dict(env, PYTHON=str(tmp_path / "mine"))),
                   check=True)
    assert first_word() == "mine"


def test_call_scripts_without_python_or_model_flags(image_root, tiny_store, tmp_path):
    """From a shell whose 'python' is not the project's interpreter (it fails as a bare system python would), no
    $PYTHON, and no model flags but --model (a factory is code: it comes from the command line, never from the
    store): the scripts find an interpreter with torch and the stages read the rest (weights, layer) from the
    store. The numbers equal those of the stage scripts run with every flag."""
    store, out = shutil.copytree(tiny_store, str(tmp_path / "store")), str(tmp_path / "out")
    model = ["--model", "tests.tiny_models:tiny_resnet"]
    rt = ["--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/usr/bin/env bash\necho \"No module named 'torch'\" >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):  # python3 is then the fallback: this one
        os.symlink(sys.executable, bin_dir / "python3")
    triples = tmp_path / "mine.txt"
    triples.write_text("1 0 1\n")
    env = {"PYTHON": "", "TRIPLES": str(triples), "OUT_DIR": out, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    s3 = run("disentanglement_calls.sh", [image_root, store, *model, *rt], env)
    assert s3.returncode == 0, s3.stdout + s3.stderr
    s4 = run("quantitative_evaluation_calls.sh", [image_root, store, *model, *rt], env)
    assert s4.returncode == 0, s4.stdout + s4.stderr
    ref_out = str(tmp_path / "ref_out")
    # with a fresh process's thread count, as the call script's (an earlier test may have changed this one's)
    run_stage("get_results.py", "--data_dir", image_root, "--model_dir", store, *model, *rt,
              "--channel_of_interest", 1, "--classes_for_concept1", 0, "--classes_for_concept2", 1,
              "--get_quantitative", "--proportion_attribution_required", "0.03", "--out_dir", ref_out)
    for name in ("quantitative_concept1_required0.03.txt", "quantitative_concept2_required0.03.txt",
                 "means_required0.03.txt"):
        with open(os.path.join(out, "results_quantitative", name)) as a, \
                open(os.path.join(ref_out, "results_quantitative", name)) as b:
            assert a.read() == b.read()
