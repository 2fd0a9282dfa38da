"""The two call scripts: the paper's 20 triples, folders from arguments or environment, stop at first failure."""
import os
import re
import subprocess

from tests.conftest import ROOT

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


def test_disentanglement_calls_runs_the_20_triples(tmp_path):
    py, log = fake_python(tmp_path)
    proc = run("disentanglement_calls.sh", ["/d", "/s", "--device", "cpu"], {"PYTHON": py})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    got = [(int(flag(c, "channel_disentangle")), int(flag(c, "classes_for_concept1")),
            int(flag(c, "classes_for_concept2"))) for c in calls]
    assert got == PAPER_TRIPLES
    for c in calls:
        assert c.split()[0].endswith("disentangle_channel.py")
        assert flag(c, "data_dir") == "/d" and flag(c, "store_dir") == "/s" and flag(c, "model") == "resnet50"
        assert flag(c, "nr_channels_in_layer_of_interest") == "2048" and c.endswith("--device cpu")


def test_quantitative_calls_use_tau_003_and_environment(tmp_path):
    py, log = fake_python(tmp_path)
    proc = run("quantitative_evaluation_calls.sh", [], {"PYTHON": py, "DATA_DIR": "/d", "STORE_DIR": "/s",
                                                         "OUT_DIR": "/o"})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    got = [(int(flag(c, "channel_of_interest")), int(flag(c, "classes_for_concept1")),
            int(flag(c, "classes_for_concept2"))) for c in calls]
    assert got == PAPER_TRIPLES
    for c in calls:
        assert flag(c, "proportion_attribution_required") == "0.03" and "--get_quantitative" in c
        assert flag(c, "model_dir") == "/s" and flag(c, "out_dir") == "/o"
        assert flag(c, "layer_of_interest") == "layer4.2.conv3"


def test_call_scripts_stop_at_first_failure(tmp_path):
    for script in ("disentanglement_calls.sh", "quantitative_evaluation_calls.sh"):
        py, log = fake_python(tmp_path, fail_on_call=3)
        proc = run(script, ["/d", "/s"], {"PYTHON": py})
        assert proc.returncode == 3
        assert len(log.read_text().splitlines()) == 3
        assert proc.stdout.count("===") == 3


def test_call_scripts_need_the_folders(tmp_path):
    py, log = fake_python(tmp_path)
    env = {"PYTHON": py, "DATA_DIR": "", "STORE_DIR": "", "MODEL_DIR": ""}
    for script in ("disentanglement_calls.sh", "quantitative_evaluation_calls.sh"):
        proc = run(script, [], env)
        assert proc.returncode != 0 and "DATA_DIR" in proc.stderr
        assert log.read_text() == ""
