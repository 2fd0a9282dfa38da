r"""Stage 3: split one channel into a channel per concept, for every rho, and pick the best rho.

Example (the paper's headline channel: digital clock vs. cauliflower):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --channel_disentangle 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938
"""
import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

from utils import cli, context, data, disentangle, fileio, similarities, store
from utils.disentangle import RHOS, checkpoint_name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p)
    p.add_argument("--channel_disentangle", type=int, required=True, help="channel of the layer to split")
    p.add_argument("--classes_for_concept1", nargs="+", required=True, help="class indices of concept 1")
    p.add_argument("--classes_for_concept2", nargs="+", required=True, help="class indices of concept 2")
    args = p.parse_args()
    s1 = cli.parse_classes(args.classes_for_concept1, "--classes_for_concept1")
    s2 = cli.parse_classes(args.classes_for_concept2, "--classes_for_concept2")
    c = args.channel_disentangle

    ctx = context.setup(args, split="train")
    context.check_channel(ctx, c, "--channel_disentangle")
    context.check_concepts(ctx.dataset, s1, s2)
    st = store.Store.open(store.store_folder(args.store_dir, ctx.tag), ctx.fingerprint)
    targets = np.asarray(st.array("targets"))
    w_c = ctx.conv.weight[c].detach()
    bias_c = None if ctx.conv.bias is None else ctx.conv.bias[c].detach()
    v = []
    for classes in (s1, s2):
        rows = np.flatnonzero(np.isin(targets, classes))
        v.append(similarities.arv(w_c, similarities.rows_mean_patch_sums(st.array("patch_sums"), rows)).float())
    all_filters = disentangle.split_filters(w_c, v[0], v[1])

    indices = data.indices_of_classes(ctx.dataset, s1 + s2)
    loader = data.make_loader(ctx.dataset, data.batches_of(indices, args.batch_size),
                              cli.default_workers(args.num_workers), ctx.device)
    model = ctx.model.to(ctx.device)
    scores = disentangle.score_all_rhos(model, ctx.conv, all_filters, bias_c, loader, s1, s2, ctx.device,
                                        progress=lambda it: tqdm(it, desc="scoring 20 rho", unit="batch"))
    best = disentangle.best_rho_index(scores)

    folder = os.path.join(args.store_dir, "models_disentangled")
    for r, rho in enumerate(RHOS):
        fileio.save_torch(os.path.join(folder, checkpoint_name(ctx.tag, c, s1, s2, rho)),
                          disentangle.checkpoint_state_dict(all_filters[r], bias_c))
    best_sd = disentangle.checkpoint_state_dict(all_filters[best], bias_c)

    # exactness: the disentangled network computes the same logits as the original
    images = torch.stack([ctx.dataset[i][0] for i in indices[:args.batch_size]]).to(ctx.device)
    dmodel = disentangle.disentangled_model(model, ctx.layer_path, c, best_sd)
    diff, zmax = disentangle.max_logit_difference(model, dmodel, images)
    ok = diff <= 1e-4 * max(1.0, zmax)
    best_path = os.path.join(folder, checkpoint_name(ctx.tag, c, s1, s2, "best"))
    fileio.save_torch(best_path, best_sd)
    base = best_path[:-len("_f_best_unnormalized.pth")]
    n1, n2 = int(np.isin(targets, s1).sum()), int(np.isin(targets, s2).sum())
    src1, src2 = disentangle.split_sources(v[0], v[1], RHOS[best])
    fileio.write_json(base + "_info.json", dict(
        ctx.fingerprint, channel=c, classes1=s1, classes2=s2, rhos=RHOS, scores=scores.tolist(),
        best_rho=RHOS[best], best_checkpoint=os.path.basename(best_path), max_logit_diff=diff,
        exact=ok, train_images_concept1=n1, train_images_concept2=n2,
        sources_concept1=int(src1.sum()), sources_concept2=int(src2.sum()), arv_concept1=v[0].tolist(),
        arv_concept2=v[1].tolist()))
    from utils import plots  # matplotlib: not needed for --help or a failed check
    plots.rho_score_plot(base + "_scores.png", RHOS, scores.tolist(), RHOS[best],
                         f"{ctx.tag} channel {c}: {s1} vs {s2}")

    names = st.manifest["classes"]
    print(f"channel {c} of {ctx.layer_path}: concept 1 = {[names[y] for y in s1]} ({n1} train images), "
          f"concept 2 = {[names[y] for y in s2]} ({n2} train images)")
    print("rho    " + " ".join(f"{r:>5}" for r in RHOS))
    print("score  " + " ".join(f"{s:5.2f}" for s in scores.tolist()))
    print(f"best rho = {RHOS[best]} (score {scores[best]:.4f}); {int(src1.sum())} input channels go to "
          f"concept 1, {int(src2.sum())} to concept 2, {len(v[0]) - int(src1.sum() + src2.sum())} to both")
    print(f"exactness check on {len(images)} images: max |logit difference| = {diff:.3g} "
          f"(max |logit| {zmax:.3g}, tolerance 1e-4 relative): {'OK, same function' if ok else 'FAILED'}")
    print(f"wrote 20 checkpoints and {os.path.basename(best_path)} to {folder}")
    if not ok:
        raise cli.UserError("the disentangled network does not reproduce the original logits")


if __name__ == "__main__":
    cli.run(main)
