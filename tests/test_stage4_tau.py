"""Stage 4's tau without --proportion_attribution_required: stage 2's, from the --candidates file or the store's
stage-2 records of the layer (utils/stages/stage4_tau.py), on hand-built records. The scripts on the tiny
ResNet: tests/test_stage2_advice.py::test_stage4_script_takes_stage2_tau."""
import json
import os

from utils.files import names
from utils.stages import stage4_tau


def record(store, base, tau, p, layer="conv3", model="m"):
    path = names.candidates_json(store, base)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump({"proportion_attribution_required": tau, "p": p, "model": model, "layer": layer, "candidates": []},
              open(path, "w"))
    return path


def test_choose_order_given_then_file_then_store_then_published(tmp_path):
    store = str(tmp_path)
    assert stage4_tau.choose(0.2, None, {}) == (0.2, None)  # given: used, nothing printed
    assert stage4_tau.choose(None, None, {})[0] == 0.03
    assert "no stage-2 record" in stage4_tau.choose(None, None, {})[1]
    a = record(store, "a", 0.01, 0.5)
    record(store, "b", 0.01, 0.75)
    record(store, "other_layer", 0.05, 0.5, layer="conv2")  # another layer's record does not count
    record(store, "other_model", 0.05, 0.5, model="n")
    recs = stage4_tau.stage2_records(store, "m", "conv3")
    assert sorted(recs.values()) == [(0.01, 0.5), (0.01, 0.75)]
    tau, line = stage4_tau.choose(None, None, recs)
    assert tau == 0.01 and a in line and "1 more record" in line
    c = record(store, "c", 0.05, 0.75)
    tau, line = stage4_tau.choose(None, None, stage4_tau.stage2_records(store, "m", "conv3"))
    assert tau == 0.03 and "disagree (tau 0.01, 0.05)" in line
    tau, line = stage4_tau.choose(None, c, {})  # --candidates: its own record, whatever the store holds
    assert tau == 0.05 and c in line and "p=0.75" in line
    assert stage4_tau.choose(0.1, c, {}) == (0.1, None)
    concepts = tmp_path / "concepts.json"  # a concepts file (--label_free) records no tau: the store decides
    concepts.write_text(json.dumps({"channels": {}}))
    assert stage4_tau.choose(None, str(concepts), {})[0] == 0.03
