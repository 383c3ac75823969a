"""Fix-res on Fashion-MNIST: train a small net at a low resolution, test at 28 px before and after
the fix-res fine-tune (shallow blocks frozen, un-augmented labeled images at the test resolution).

    python benchmarks/fixres_fashion.py            # ~2-3 minutes on one CPU core

Needs the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist, or --root). The last line
printed is a JSON object with top-1 (%) on the 10,000 test images: at the train resolution,
at the test resolution before the fine-tune, after it, and the change.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from noisystudent.config.schema import DataConfig, NoiseConfig, TrainConfig
from noisystudent.data.datasets import TransformedSet
from noisystudent.data.splits import build_splits
from noisystudent.runtime.distributed import DistContext
from noisystudent.evaluate.classifier import evaluate_classifier
from noisystudent.train.fixres import default_frozen_blocks, finetune_fixres
from noisystudent.models.factory import count_parameters, create_model
from noisystudent.train.loop import train_classifier
from noisystudent.data.transforms import eval_transform, train_transform


def materialize(images, transform) -> TensorDataset:
    """Apply a deterministic transform once (evaluation and fine-tune reuse the tensors)."""
    ds = TransformedSet(images, transform)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--model", default="ns_cnn_s")
    p.add_argument("--train-size", type=int, default=20)
    p.add_argument("--test-size", type=int, default=28)
    p.add_argument("--labels-per-class", type=int, default=500)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ft-epochs", type=float, default=1.5, help="fix-res epochs (paper: 1.5)")
    p.add_argument("--ft-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--frozen-blocks", type=int, default=None, help="default: all but the last stage")
    p.add_argument("--also-frozen", default="", help="comma list of other frozen_blocks values to "
                   "fine-tune from the same trained model and report under 'variants'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("fixres")
    start = time.time()

    data_cfg = DataConfig(source="fashion-mnist", root=args.root, labels_per_class=args.labels_per_class,
                          val_per_class=50, image_size=args.train_size, flip=True)
    splits = build_splits(data_cfg, args.seed)
    ch, mean, std = splits.channels, splits.mean, splits.std
    noise = NoiseConfig(augment=True, randaugment_ops=2, randaugment_magnitude=9, dropout=0.3, drop_path=0.1)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, unlabeled_ratio=0,
                            weight_decay=5e-4, label_smoothing=0.1)
    ctx = DistContext(device=torch.device("cpu"))

    random.seed(args.seed)  # RandAugment draws from Python's random module
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = create_model(args.model, splits.num_classes, ch, noise.dropout, noise.drop_path)
    low, high = (eval_transform(s, ch, mean, std) for s in (args.train_size, args.test_size))
    labeled_noisy = TransformedSet(splits.labeled, train_transform(args.train_size, ch, mean, std, noise, True))
    val_low, test_low = materialize(splits.val, low), materialize(splits.test, low)
    log.info(f"{args.model} ({count_parameters(model) / 1e6:.2f}M params): {len(splits.labeled)} labeled, "
             f"{len(splits.test)} test; training at {args.train_size}px for {args.epochs} epochs")
    outcome = train_classifier(model, labeled_noisy, val_low, train_cfg, num_classes=splits.num_classes,
                               epochs=args.epochs, lr=args.lr, ctx=ctx, seed=args.seed, progress=False)
    train_seconds = outcome.seconds
    top1_low = evaluate_classifier(model, test_low, ctx.device)["top1"]

    labeled_high, val_high, test_high = (materialize(s, high) for s in (splits.labeled, splits.val, splits.test))
    frozen = args.frozen_blocks if args.frozen_blocks is not None else default_frozen_blocks(model)
    ft_lr = args.ft_lr if args.ft_lr is not None else args.lr / 10
    trained = copy.deepcopy(model.state_dict())
    variants = {}
    for n in [int(v) for v in args.also_frozen.split(",") if v.strip()]:
        model.load_state_dict(trained)
        torch.manual_seed(args.seed)
        v = finetune_fixres(model, labeled_high, val_high, train_cfg, num_classes=splits.num_classes,
                            test=test_high, frozen_blocks=n, epochs=args.ft_epochs, lr=ft_lr,
                            batch_size=args.batch_size, ctx=ctx, seed=args.seed)
        variants[str(n)] = {"top1_at_test_size_after": round(v.after["test_top1"], 2),
                            "val_top1_after": round(v.after["val_top1"], 2)}
    model.load_state_dict(trained)
    torch.manual_seed(args.seed)  # the same dropout draws whatever variants ran before
    ft = finetune_fixres(model, labeled_high, val_high, train_cfg, num_classes=splits.num_classes,
                         test=test_high, frozen_blocks=frozen, epochs=args.ft_epochs, lr=ft_lr,
                         batch_size=args.batch_size, ctx=ctx, seed=args.seed)
    result = {
        "benchmark": "fixres_fashion", "model": args.model, "params": count_parameters(model),
        "train_size": args.train_size, "test_size": args.test_size, "labeled": len(splits.labeled),
        "test_images": len(splits.test), "train_epochs": args.epochs, "train_seconds": round(train_seconds, 1),
        "top1_at_train_size": round(top1_low, 2),
        "top1_at_test_size_before": round(ft.before["test_top1"], 2),
        "top1_at_test_size_after": round(ft.after["test_top1"], 2),
        "fixres_change": round(ft.after["test_top1"] - ft.before["test_top1"], 2),
        "val_top1_before": round(ft.before["val_top1"], 2), "val_top1_after": round(ft.after["val_top1"], 2),
        "frozen_blocks": ft.frozen_blocks, "total_blocks": ft.total_blocks, "finetune_epochs": ft.epochs,
        "finetune_steps": ft.steps, "finetune_lr": ft_lr, "finetune_seconds": round(ft.seconds, 1),
        **({"variants_frozen_blocks": variants} if variants else {}),
        "threads": args.threads, "seed": args.seed, "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
