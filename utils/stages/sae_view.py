r"""Stage 4's --get_sae_view: train (or reuse) a TopK SAE on the layer's input, then show which of its
features drive the channel of interest (utils/method/sae.py has the SAE and the decomposition).

1. One pass over the training images (all, or --sae_train_images spread evenly over the classes) up to
   the layer collects --sae_positions_per_image input vectors per image, drawn where ||x|| is large.
2. The SAE is trained on them and saved as MODEL_DIR/sae/sae_{key}.pt with what made it (model, weights'
   sha256, layer and geometry, the training split's classes, counts, file list and the bytes of a few of
   its images, every setting): a later run with the same record reuses it, any other record trains anew.
3. On the scope's val images (the concepts' classes, or all with --top_images_all_val): the channel's
   positive mass pos(a[c]), each feature's own activation sum_{h,w} f_j (its top images), the FVU of
   the reconstruction and the features that never fire. On the channel's TOP_OF_CHANNEL top images:
   contribution_j = conv(f_j, K_j) and its positive mass pos(contribution_j); the features with the
   largest mean pos(contribution_j) are listed with share_j = sum_n pos(contribution_j) / sum_n pos(a[c]).
"""
import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm
from utils.model import tap

from utils.data import folders
from utils.files import atomic
from utils.method import sae as S
from utils.run.cli import UserError, at_least, default_workers
from utils.method.split import filter_maps, positive_mass
from utils.method.evaluation import top_k

DEFAULTS = {"sae_expansion": 8, "sae_k": 8, "sae_steps": 2000, "sae_positions_per_image": 4, "sae_seed": 0,
            "sae_lr": 1e-3, "sae_batch_size": 1024, "sae_train_images": 0}
TOP_OF_CHANNEL = 32     # the channel's top val images on which contributions are averaged
LISTED = 8              # features listed in the view
CONTENT_IMAGES = 64     # training images whose bytes enter the SAE's record
VERSION = 1


def add_args(parser):
    """The --get_sae_view flags (a bad value: UserError, one line, exit status 2)."""
    g = parser.add_argument_group("sparse-autoencoder view (--get_sae_view)")
    g.add_argument("--get_sae_view", action="store_true",
                   help="train (or reuse) a TopK SAE on the layer's input and list the features that drive the "
                        "channel: plots/sae_view_{run}.png and results_disentanglement/{run}_sae_view.json")
    for name, kind, low, text in (
            ("sae_expansion", int, 1, "dictionary size m = this times C_in"),
            ("sae_k", int, 1, "features active per position (at most m)"),
            ("sae_steps", int, 1, "Adam steps"),
            ("sae_positions_per_image", int, 1, "input positions sampled per training image, where ||x|| is large"),
            ("sae_seed", int, 0, "seed of the sampling, initialisation and batches"),
            ("sae_lr", float, 1e-12, "Adam learning rate"),
            ("sae_batch_size", int, 1, "vectors per step"),
            ("sae_train_images", int, 0, "training images to sample from, spread over the classes (0: all)")):
        say = "positive" if low == 1e-12 else None
        g.add_argument("--" + name, type=at_least("--" + name, low, kind, say), default=DEFAULTS[name],
                       help=f"{text} (default {DEFAULTS[name]})")
    return parser


def check_args(args, conv):
    """Refuse settings that cannot work with this layer, before anything runs or is written."""
    if getattr(args, "get_sae_view", False):
        m = args.sae_expansion * conv.in_channels
        if args.sae_k > m:
            raise UserError(f"--sae_k {args.sae_k} is larger than the dictionary: m = --sae_expansion "
                            f"{args.sae_expansion} x {conv.in_channels} inputs = {m}")


def settings_of(args):
    """The --sae_* settings and the image batch size (the sampling draws batch by batch)."""
    return dict({k: getattr(args, k) for k in DEFAULTS}, batch_size=args.batch_size)


def record_of(ctx, train_ds, settings):
    """What an SAE is made from (a dict) and the 16 hex digits of its sha256 that name the file."""
    from utils.featurevis.render import files_sha256, spectrum_images
    summary = folders.dataset_summary(train_ds)
    sample = spectrum_images(train_ds, CONTENT_IMAGES)
    from utils.model.loading import layer_geometry
    meta = {"model": ctx.model_spec, "weights_sha256": ctx.weights_sha256, "layer": ctx.layer_path,
            "layer_geometry": layer_geometry(ctx.conv), "classes": summary["classes"],
            "images_per_class": summary["images_per_class"], "files_sha256": summary["files_sha256"],
            "content_sha256": files_sha256(train_ds.samples[i][0] for i in sample),
            "transform": getattr(ctx, "transform", folders.DEFAULT_TRANSFORM).describe(), "settings": settings,
            "sampling": "positions without replacement, probability proportional to ||x||", "version": VERSION}
    return meta, hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def collect_vectors(model, conv, ds, indices, per_image, seed, batch_size, device, num_workers):
    """One pass over images ``indices`` of ``ds`` up to the layer: ``per_image`` sampled input vectors of
    each (``sae.sample_positions``). Returns (vectors (N * p, C_in) float32 on the CPU, images read)."""
    gen = torch.Generator().manual_seed(int(seed))
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), num_workers, device, unreadable="skip")
    out, n = [], 0
    for images, _ in tqdm(loader, desc="SAE: sampling the layer's input", unit="batch", dynamic_ncols=True):
        x = tap.layer_input(model, conv, images.to(device, non_blocking=True)).float()
        out.append(S.sample_positions(x, per_image, gen).cpu())
        n += len(x)
    if not out:
        raise UserError("SAE: none of the training images could be read")
    return torch.cat(out), n


def load_or_train(ctx, args, device):
    """The SAE of these model, layer, training data and settings: reused from MODEL_DIR/sae/ when its record
    matches, else trained and saved. Returns (sae on ``device``, info dict, path, reused)."""
    train_ds = folders.image_folder(args.data_dir, "train", transform=folders.eval_transform(ctx.transform))
    settings = settings_of(args)
    meta, key = record_of(ctx, train_ds, settings)
    path = os.path.join(args.model_dir, "sae", f"sae_{key}.pt")
    m = args.sae_expansion * ctx.conv.in_channels
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 -- unreadable: train anew and replace it
            saved = {"meta": "null"}
        if json.loads(saved["meta"]) == meta:
            sae = S.TopKSAE(ctx.conv.in_channels, m, args.sae_k)
            sae.load_state_dict(saved["state_dict"])
            return sae.to(device).eval(), saved["info"], path, True
    start = time.time()
    if args.sae_train_images:
        from utils.featurevis.render import spectrum_images
        indices = spectrum_images(train_ds, args.sae_train_images)
    else:
        indices = list(range(len(train_ds)))
    vectors, n_images = collect_vectors(ctx.model.to(device), ctx.conv, train_ds, indices,
                                        args.sae_positions_per_image, args.sae_seed, args.batch_size, device,
                                        default_workers(args.num_workers))
    vectors = vectors.to(device)
    sae, losses = S.train_sae(vectors, m, args.sae_k, args.sae_steps, args.sae_batch_size, args.sae_lr,
                              args.sae_seed, progress=True)
    with torch.no_grad():
        active, parts = torch.zeros(m, device=device), []
        for v in vectors.split(8192):
            f = sae.encode(v)
            parts.append(sae.decode(f))
            active += (f > 0).sum(dim=0)
        x_hat = torch.cat(parts)
    info = {"train_images": n_images, "vectors": int(len(vectors)), "input_dim": ctx.conv.in_channels,
            "dictionary": m, "k": args.sae_k, "final_loss": losses[-1],
            "loss_every_100_steps": losses[::100],
            "fvu_train": S.fraction_of_variance_unexplained(vectors, x_hat),
            "dead_train": len(S.dead_features(active.cpu())), "seconds": round(time.time() - start, 2),
            "device": str(device)}
    atomic.save_torch(path, {"meta": json.dumps(meta), "info": info,
                             "state_dict": {k: v.detach().cpu() for k, v in sae.state_dict().items()}})
    return sae, info, path, False


def scan(model, conv, sae, channel, ds, indices, batch_size, device, num_workers, unreadable, top):
    """On val images ``indices``: pos(a[c]) (N,), each feature's top ``top`` images by its activation sum
    (values and positions in ``indices``, (m, T)), FVU of the reconstruction over all positions, and
    the count of positions where each feature fires (m,)."""
    w = conv.weight[channel:channel + 1].detach()
    b = None if conv.bias is None else conv.bias[channel:channel + 1].detach()
    m = sae.W_dec.shape[1]
    pos_c, best_v, best_i = [], torch.full((m, 0), -1.0), torch.zeros((m, 0), dtype=torch.long)
    err = tot = 0.0
    s1, s2, count = 0, 0.0, 0
    active = torch.zeros(m, dtype=torch.long)
    seen = 0
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), num_workers, device, unreadable)
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="SAE view: val images", unit="batch", dynamic_ncols=True):
            x = tap.layer_input(model, conv, images.to(device, non_blocking=True)).float()
            pos_c.append(positive_mass(filter_maps(x, conv, w, b))[:, 0].cpu())
            f = S.feature_maps(sae, x)
            xh = S.reconstruction(sae, f)
            err += float((x - xh).double().pow(2).sum())
            xv = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            s1, s2, count = s1 + xv.sum(dim=0), s2 + float(xv.pow(2).sum()), count + len(xv)
            active += (f > 0).sum(dim=(0, 2, 3)).cpu()
            sums = f.sum(dim=(2, 3)).T.cpu()  # (m, B)
            ids = torch.arange(seen, seen + len(x)).expand(m, -1)
            seen += len(x)
            v, j = torch.cat([best_v, sums], 1), torch.cat([best_i, ids], 1)
            keep = v.topk(min(top, v.shape[1]), dim=1)
            best_v, best_i = keep.values, torch.gather(j, 1, keep.indices)
    if not pos_c:
        raise UserError(f"none of the {len(indices)} val images could be read")
    skipped = set(loader.skipped)
    kept = np.asarray([i for i in indices if i not in skipped])
    var = s2 - float((s1 * s1).sum()) / max(count, 1)
    return {"index": kept, "pos_channel": torch.cat(pos_c).numpy(), "feature_top_values": best_v.numpy(),
            "feature_top_images": kept[best_i.numpy()], "fvu": err / max(var, 1e-30), "active": active.numpy()}


def contributions_on(model, conv, sae, channel, ds, indices, batch_size, device):
    """pos(contribution_j) per image (N, m), pos(a[c]) (N,), pos of the constant term (N,) and the checks
    max |sum_j contribution_j + constant - conv(x_hat)[c]| and the channel map's FVU a[c] vs conv(x_hat)[c]."""
    w_c = conv.weight[channel].detach()
    b_c = None if conv.bias is None else conv.bias[channel].detach()
    pc, pa, pk, worst, errs, maps = [], [], [], 0.0, 0.0, []
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), 0, device, "skip")
    with torch.no_grad():
        for images, _ in loader:
            x = tap.layer_input(model, conv, images.to(device)).float()
            f = S.feature_maps(sae, x)
            contrib = S.channel_contributions(f, conv, w_c, sae.W_dec)
            const = S.constant_term(conv, w_c, b_c, sae.b_dec, x.shape[-2:])
            a_c = filter_maps(x, conv, w_c[None], None if b_c is None else b_c.reshape(1))[:, 0]
            ah_c = filter_maps(S.reconstruction(sae, f), conv, w_c[None], None if b_c is None else b_c.reshape(1))[:, 0]
            worst = max(worst, float((contrib.sum(dim=1) + const - ah_c).abs().max()))
            errs += float((a_c - ah_c).double().pow(2).sum())
            maps.append(a_c.double().cpu())
            pc.append(positive_mass(contrib).cpu())
            pa.append(positive_mass(a_c[:, None])[:, 0].cpu())
            pk.append(positive_mass(const.expand(len(x), 1, -1, -1))[:, 0].cpu())
    allmaps = torch.cat(maps)
    return {"pos_contribution": torch.cat(pc).numpy(), "pos_channel": torch.cat(pa).numpy(),
            "pos_constant": torch.cat(pk).numpy(), "decomposition_max_error": worst,
            "channel_fvu": errs / max(float((allmaps - allmaps.mean()).pow(2).sum()), 1e-30)}


def run_for_channel(ctx, args, channel, classes, run_name, out_dir):
    """Stage 4's --get_sae_view for one channel: the SAE (trained or reused), the features that drive the
    channel on its top val images (among those of ``classes``; None or --top_images_all_val: all val images),
    the figure and ``results_disentanglement/{run}_sae_view.json``."""
    from utils.report import plots
    start = time.time()
    device, model, conv, ds = ctx.device, ctx.model.to(ctx.device), ctx.conv, ctx.dataset
    sae, info, path, reused = load_or_train(ctx, args, device)
    print(f"SAE view: {'reusing' if reused else 'trained'} the SAE {path}")
    whole = args.top_images_all_val or classes is None
    indices = list(range(len(ds))) if whole else folders.indices_of_classes(ds, classes)
    workers = default_workers(args.num_workers)
    unreadable = "skip" if args.skip_unreadable else "error"
    sc = scan(model, conv, sae, channel, ds, indices, args.batch_size, device, workers, unreadable, args.top_k)
    kept = sc["index"]
    top_rows = top_k(sc["pos_channel"], TOP_OF_CHANNEL)
    top_images = [int(kept[i]) for i in top_rows]
    cb = contributions_on(model, conv, sae, channel, ds, top_images, args.batch_size, device)
    mean_contrib = cb["pos_contribution"].mean(axis=0)
    total = max(float(cb["pos_channel"].sum()), 1e-30)
    listed = [int(j) for j in top_k(mean_contrib, LISTED) if mean_contrib[j] > 0]
    names = ds.classes
    features = []
    feature_images = {}
    for j in listed:
        imgs = [int(i) for i, v in zip(sc["feature_top_images"][j], sc["feature_top_values"][j]) if v > 0]
        feature_images[j] = imgs
        features.append({"feature": j, "mean_pos_contribution": float(mean_contrib[j]),
                         "share": float(cb["pos_contribution"][:, j].sum() / total),
                         "top_images": [folders.relative_name(ds, i) for i in imgs],
                         "top_image_classes": [names[ds.targets[i]] for i in imgs],
                         "top_values": [float(v) for v in sc["feature_top_values"][j][:len(imgs)]]})
    m = sae.W_dec.shape[1]
    dead = S.dead_features(sc["active"])
    rows = [(f"channel {channel}", [(ds.samples[i][0], names[ds.targets[i]]) for i in top_images[:args.top_k]])]
    for ft in features:
        rows.append((f"f{ft['feature']}: {ft['share']:.0%}",
                     [(ds.samples[i][0], names[ds.targets[i]]) for i in feature_images[ft["feature"]]]))
    scope = "all val images" if whole else "val images of the concepts"
    fig = os.path.join(out_dir, "plots", f"sae_view_{run_name}.png")
    plots.contact_sheet(fig, rows, title=f"{ctx.tag} {ctx.layer_path} channel {channel}: SAE features by share of pos(channel) "
                                         f"on its top {len(top_images)} images ({scope}); each row its top images",
                        resize=ctx.transform.resize, crop_size=ctx.transform.crop)
    record = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": channel, "sae": path, "sae_reused": reused,
              "settings": settings_of(args), "training": info, "dictionary": m, "k": args.sae_k,
              "scope": scope, "val_images": int(len(kept)), "channel_top_images": [folders.relative_name(ds, i) for i in top_images],
              "fvu": sc["fvu"], "dead_features": len(dead), "dead_feature_ids": dead,
              "channel_fvu_on_top_images": cb["channel_fvu"], "decomposition_max_error": cb["decomposition_max_error"],
              "constant_term_share": float(cb["pos_constant"].sum() / total),
              "contribution": "pos(conv(f_j, K_j)) = sum_{h,w} max(contribution_j, 0); share_j = sum over the channel's "
                              "top images of pos(contribution_j) / sum of pos(a[c])",
              "features": features, "figure": fig, "seconds": round(time.time() - start, 2)}
    atomic.write_json(os.path.join(out_dir, "results_disentanglement", f"{run_name}_sae_view.json"), record)
    print(f"SAE: m = {m}, k = {args.sae_k}, FVU {sc['fvu']:.3f} on {len(kept)} {scope}, {len(dead)} dead features; "
          f"channel {channel} on its top {len(top_images)} images: FVU of its map {cb['channel_fvu']:.3f}")
    for ft in features:
        print(f"  feature {ft['feature']:>5}: share {ft['share']:6.1%}, mean pos contribution "
              f"{ft['mean_pos_contribution']:.4g}, top images: {', '.join(ft['top_image_classes'][:4])}")
    print(f"wrote {fig} and {out_dir}/results_disentanglement/{run_name}_sae_view.json")
    return record
