"""Throughput of DINO multi-crop: the PIL pipelines (per image, one core: MultiCrop, composed of
torchvision transforms as the reference; LeanMultiCrop, the same operations in Pillow's arithmetic in C)
against the batched tensor pipeline (BatchMultiCrop, on the CPU or a GPU).

    python -m benchmarks.augment [--device cpu|cuda] [--batch N] [--global-size 224]
                                 [--local-size 96] [--local-crops 8] [--threads 1] [--gray]

Input: scikit-learn's china.jpg resized to an ImageNet-like 500 x 375 photo, JPEG-encoded. The PIL
path decodes it and makes the crops image by image (as a DataLoader worker does); the batched path
decodes a batch once (torchvision.io.decode_jpeg) and augments it on the device; `--gray` makes
the photo one-channel, as Fashion-MNIST is. Prints one JSON line: {"benchmark": "augment",
"device", "torch", "config", "pil": {..., "lean": {...}, "lean_speedup"}, "batched": {...},
"images_per_second", "ms_per_batch", "operations"} (the top-level numbers are the batched path's;
`--ops` adds ms per operation, Pillow against stages.dino._pillow_ops).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import ImageReadMode, decode_jpeg

from benchmarks.device import device_name
from stages.dino.augment import MultiCrop
from stages.dino.augment_batch import BatchMultiCrop
from stages.dino.augment_lean import LeanMultiCrop, normalize_views


def photo_jpeg(width: int = 500, height: int = 375, quality: int = 90, gray: bool = False) -> bytes:
    """sklearn's china.jpg (else skimage's chelsea) resized to width x height (grayscale if gray),
    as JPEG bytes."""
    try:
        from sklearn.datasets import load_sample_image

        pixels = load_sample_image("china.jpg")
    except ImportError:
        from skimage import data

        pixels = data.chelsea()
    img = Image.fromarray(pixels).resize((width, height), Image.BICUBIC)
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def time_per_image(augment, jpeg: bytes, args: argparse.Namespace) -> dict:
    """Images per second of a per-image multi-crop on one core (decode included)."""
    torch.set_num_threads(1)
    augment(jpeg)
    n, start = 0, time.perf_counter()
    while n < args.pil_images or time.perf_counter() - start < args.min_seconds:
        augment(jpeg)
        n += 1
    elapsed = time.perf_counter() - start
    return {"images": n, "images_per_second": n / elapsed, "ms_per_image": 1e3 * elapsed / n}


def time_pil(jpeg: bytes, args: argparse.Namespace) -> dict:
    """MultiCrop (torchvision transforms, as the reference) and LeanMultiCrop (the pretrain stage's
    `augment: pil`; its views normalised here on the same core, as a CPU-only run does)."""
    crops = ((0.4, 1.0), (0.05, 0.4), args.local_crops, args.global_size, args.local_size)
    reference = time_per_image(MultiCrop(*crops), jpeg, args)
    lean = LeanMultiCrop(*crops)
    ours = time_per_image(lambda data: normalize_views([view[None] for view in lean(data)]), jpeg, args)
    return reference | {"lean": ours, "lean_speedup": ours["images_per_second"] / reference["images_per_second"]}


def time_operations(jpeg: bytes) -> dict:
    """ms per call of each multi-crop operation, Pillow (as torchvision calls it) against
    stages.dino._pillow_ops, on a 224² and a 96² view of the photo (one thread)."""
    import torchvision.transforms.functional as TF
    from PIL import ImageEnhance, ImageFilter

    from stages.dino._pillow_ops import color_jitter, gaussian_blur, resized_crop

    torch.set_num_threads(1)
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    source = np.asarray(img)

    def ms(call, repeats: int = 300) -> float:
        call()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        return 1e3 * (time.perf_counter() - start) / repeats

    result: dict = {"decode": ms(lambda: Image.open(io.BytesIO(jpeg)).convert("RGB").load())}
    w, h = img.size  # boxes of a global and a local crop (330 x 300 and 174 x 174 of 500 x 375)
    boxes = {224: (w // 10, h // 10, w * 76 // 100, h * 9 // 10), 96: (w // 5, h * 16 // 100, w * 548 // 1000, h * 624 // 1000)}
    for size, box in boxes.items():
        view = img.crop(box).resize((size, size), Image.BICUBIC)
        pixels, work, out = np.array(view), np.array(view), np.empty((size, size, 3), np.uint8)

        def ours(call):  # on a fresh copy each time, the copy timed apart
            return ms(lambda: (np.copyto(work, pixels), call())) - ms(lambda: np.copyto(work, pixels))

        def jitter(op: bytes, factors=(1.0, 1.0, 1.0), hue: int = 0, gray: bool = False):
            return ours(lambda: color_jitter(work, op, *factors, hue, gray))

        pairs = {
            "crop+resize": (ms(lambda: img.crop(box).resize((size, size), Image.BICUBIC)),
                            ms(lambda: resized_crop(source, *source.shape[:2], box, out, size, False))),
            "brightness": (ms(lambda: ImageEnhance.Brightness(view).enhance(1.2)), jitter(b"\x00", (1.2, 1.0, 1.0))),
            "contrast": (ms(lambda: ImageEnhance.Contrast(view).enhance(0.8)), jitter(b"\x01", (1.0, 0.8, 1.0))),
            "saturation": (ms(lambda: ImageEnhance.Color(view).enhance(1.1)), jitter(b"\x02", (1.0, 1.0, 1.1))),
            "hue": (ms(lambda: TF.adjust_hue(view, 0.05)), jitter(b"\x03", hue=12)),
            "grayscale": (ms(lambda: view.convert("L").convert("RGB")), jitter(b"", gray=True)),
            "blur": (ms(lambda: view.filter(ImageFilter.GaussianBlur(1.05))),
                     ours(lambda: gaussian_blur(work, size, size, 1.05))),
        }
        result[str(size)] = {name: {"pil_ms": pil, "ours_ms": mine} for name, (pil, mine) in pairs.items()}
    return result


def time_batched(jpeg: bytes, args: argparse.Namespace, device: torch.device) -> dict:
    """Images per second of BatchMultiCrop on already decoded uint8 batches (decode timed apart)."""
    torch.set_num_threads(args.threads)
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    start = time.perf_counter()
    mode = ImageReadMode.GRAY if args.gray else ImageReadMode.RGB
    decoded = [decode_jpeg(data, mode=mode) for _ in range(args.batch)]
    decode_ms = 1e3 * (time.perf_counter() - start)
    images = torch.stack(decoded).to(device)
    aug = BatchMultiCrop((0.4, 1.0), (0.05, 0.4), args.local_crops, args.global_size, args.local_size)
    generator = torch.Generator(device=images.device).manual_seed(0)

    def step() -> float:
        """Seconds until the host has issued the batch's work (on a GPU, less than the batch)."""
        start = time.perf_counter()
        aug(images, generator)
        issued = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return issued

    for _ in range(args.warmup):
        step()
    with OperationCount() as count:
        step()
    times, host_times = [], []
    for _ in range(args.iters):
        start = time.perf_counter()
        host_times.append(step())
        times.append(time.perf_counter() - start)
    ms = 1e3 * float(np.median(times))
    return {"images_per_second": args.batch / (ms / 1e3), "ms_per_batch": ms,
            "ms_per_batch_min": 1e3 * min(times), "host_ms_per_batch": 1e3 * float(np.median(host_times)),
            "operations_per_batch": count.operations, "decode_ms_per_batch": decode_ms,
            "resample": aug.resample_mode(images), "threads": args.threads}


class OperationCount(TorchDispatchMode):
    """Counts the torch operations dispatched (each costs the host a few microseconds on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the batched path")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pil-images", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--skip-pil", action="store_true")
    parser.add_argument("--gray", action="store_true", help="one-channel input")
    parser.add_argument("--ops", action="store_true", help="also time each operation, Pillow against ours")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    jpeg = photo_jpeg(*args.image_size, gray=args.gray)
    pil = None if args.skip_pil else time_pil(jpeg, args)
    batched = time_batched(jpeg, args, device)
    config = {"batch": args.batch, "global_size": args.global_size, "local_size": args.local_size,
              "global_crops": 2, "local_crops": args.local_crops, "image_size": list(args.image_size),
              "threads": args.threads, "iters": args.iters, "gray": args.gray}
    print(json.dumps({"benchmark": "augment", "device": device_name(device), "torch": torch.__version__,
                      "config": config, "pil": pil, "batched": batched,
                      "operations": time_operations(jpeg) if args.ops else None,
                      "images_per_second": batched["images_per_second"],
                      "ms_per_batch": batched["ms_per_batch"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
