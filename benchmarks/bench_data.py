"""Throughput of the training inputs: synthetic-set build, dataset items/s (with and without
DataLoader workers) and the losses' forward+backward time on the small config, on this machine.

    python benchmarks/bench_data.py [--size 64] [--batch 4] [--device cpu]

VGG19 uses random weights of the right shape (speed does not depend on the values).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def median_time(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="frame size of the dataset items and losses")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from torchvision.models import vgg19

    from fnevr.data import DatasetRepeater, FramesDataset, ensure_synthetic_dataset
    from fnevr.losses import (
        PerceptualPyramidLoss,
        RandomTPS,
        equivariance_jacobian_loss,
        equivariance_value_loss,
        feature_matching_loss,
        lsgan_generator_loss,
    )
    from fnevr.metrics import evaluate_pairs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        root = ensure_synthetic_dataset(tmp / "synthetic")
        rows.append(("synthetic set build (40+8 videos, 32 frames, 64x64)", time.perf_counter() - start, "s"))
        aug = {
            "flip_param": {"horizontal_flip": True, "time_flip": True},
            "jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1},
        }
        dataset = DatasetRepeater(
            FramesDataset(root, (args.size, args.size), id_sampling=True, augmentation=aug, seed=0), 10
        )
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch, num_workers=workers, shuffle=True, pin_memory=torch.cuda.is_available()
            )
            batches = iter(loader)
            next(batches)  # worker start-up
            start, items = time.perf_counter(), 0
            for batch in batches:
                items += batch["source"].shape[0]
            rows.append(
                (
                    f"dataset items/s at {args.size}x{args.size}, augmented, {workers} workers",
                    items / (time.perf_counter() - start),
                    "items/s",
                )
            )

        with torch.device("meta"):
            trunk = vgg19(weights=None).features[:30]
        trunk = trunk.to_empty(device="cpu")
        for p in trunk.parameters():
            torch.nn.init.normal_(p, std=0.01)
        torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp / "vgg19.pth")
        device = torch.device(args.device)
        pred = torch.rand(args.batch, 3, args.size, args.size, device=device, requires_grad=True)
        target = torch.rand(args.batch, 3, args.size, args.size, device=device)
        for name, weights in (("VGG19", tmp / "vgg19.pth"), ("l1 fallback", None)):
            loss_fn = PerceptualPyramidLoss([1, 0.5, 0.25, 0.125], [10] * 5, vgg_weights=weights).to(device)
            if weights is None and loss_fn.mode != "l1":
                continue  # VGG19 weights in the hub cache: no fallback to time
            rows.append(
                (
                    f"perceptual pyramid loss ({name}) fwd+bwd, batch {args.batch}",
                    1e3 * median_time(lambda: loss_fn(pred, target).backward()),
                    "ms",
                )
            )

    kp = {
        "value": (torch.rand(args.batch, 10, 2, device=device) - 0.5).requires_grad_(True),
        "jacobian": (torch.eye(2, device=device) + 0.1 * torch.randn(args.batch, 10, 2, 2, device=device)),
    }

    def equivariance():
        tps = RandomTPS(args.batch, 0.05, 0.005, 5, device=device)
        tps.transform_frame(target)
        loss = equivariance_value_loss(kp, kp, tps) + equivariance_jacobian_loss(kp, kp, tps)
        loss.backward()

    rows.append(
        (
            f"random TPS + frame warp + equivariance losses fwd+bwd, batch {args.batch}",
            1e3 * median_time(equivariance),
            "ms",
        )
    )
    maps = {
        "prediction_map_1": torch.rand(args.batch, 1, 16, 16, device=device, requires_grad=True),
        "feature_maps_1": [
            torch.rand(args.batch, c, 16, 16, device=device, requires_grad=True) for c in (64, 128, 256, 512)
        ],
    }
    rows.append(
        (
            "LSGAN + feature matching fwd+bwd",
            1e3
            * median_time(
                lambda: (lsgan_generator_loss(maps) + feature_matching_loss(maps, maps, [10] * 4)).backward()
            ),
            "ms",
        )
    )
    frames = torch.rand(32, 3, args.size, args.size, device=device)
    rows.append(
        (
            f"evaluate_pairs (L1, PSNR, SSIM) on 32 frames {args.size}x{args.size}",
            1e3 * median_time(lambda: evaluate_pairs(frames, frames.flip(-1))),
            "ms",
        )
    )

    print(
        f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, python "
        f"{sys.version.split()[0]}"
    )
    print(f"| {'measurement':<72} | {'value':>10} | unit    |")
    print(f"|{'-' * 74}|{'-' * 12}|---------|")
    for name, value, unit in rows:
        print(f"| {name:<72} | {value:>10.1f} | {unit:<7} |")


if __name__ == "__main__":
    main()
