"""The path exported ``…_model.json`` files name (``from utils.disentangle import load_disentangled_model``): the
disentangled network lives in ``utils.model.disentangled``; this module keeps its names importable here."""
from utils.model.disentangled import (checkpoint_problem, concepts_of_checkpoint, conv_geometry,  # noqa: F401
                                      disentangled_conv, disentangled_layer, disentangled_model, export_model,
                                      exported_state_dict, exported_weights, load_disentangled_model, logit_difference,
                                      logits, network_check)
