"""Feature extraction: poolings against a ViT forward written out by hand, the features artifact,
order-preserving (distributed) gathering, and the extract stage end to end on tiny shards."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages import extract
from stages.dino.backbones import build_backbone
from stages.extract import ShardImages, extract_features, pool_features
from stages.extract import run as extract_run
from stages.features import FeaturesError, read_features, write_features
from stages.params import validate_params
from tests.conftest import tiny_params

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def tiny_vit(seed: int = 0, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", patch_size=4, img_size=16, embed_dim=24, depth=depth, num_heads=2)
    # Random (non-default) norm parameters, so that a forgotten final norm is caught.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return model.eval()


def manual_vit_tokens(model, images: torch.Tensor) -> list[torch.Tensor]:
    """The DINO ViT written out: patchify + linear, CLS, position embedding, pre-norm blocks
    (softmax attention with qkv bias, GELU MLP, residuals). Returns every block's output through
    the final norm, (B, 1 + N, D) each, first block first."""
    p = model.patch_size
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    weight = model.patch_embed.proj.weight.reshape(model.embed_dim, -1)  # (D, C·p·p)
    patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
    x = patches @ weight.T + model.patch_embed.proj.bias
    pos = model.pos_embed
    n_stored = pos.shape[1] - 1
    if n_stored != gh * gw:  # the reference's interpolation (tested in the backbone's own tests)
        side = int(math.sqrt(n_stored))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1) + pos
    outputs = []
    for block in model.blocks:
        heads = block.attn.num_heads
        y = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, 1e-6)
        q, k, v = (y @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, x.shape[-1])
        x = x + out @ block.attn.proj.weight.T + block.attn.proj.bias
        y = F.layer_norm(x, (x.shape[-1],), block.norm2.weight, block.norm2.bias, 1e-6)
        y = F.gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
        x = x + y
        outputs.append(F.layer_norm(x, (x.shape[-1],), model.norm.weight, model.norm.bias, 1e-6))
    return outputs


@pytest.fixture(scope="module")
def vit_and_images():
    model = tiny_vit()
    torch.manual_seed(1)
    return model, torch.randn(5, 3, 16, 16)


def test_cls_and_last_blocks_match_the_hand_written_forward(vit_and_images):
    model, images = vit_and_images
    with torch.no_grad():
        blocks = manual_vit_tokens(model, images)
        cls = pool_features(model, images, "cls")
        last2 = pool_features(model, images, "last_blocks", n_last_blocks=2)
        last3 = pool_features(model, images, "last_blocks", n_last_blocks=3)
    assert cls.shape == (5, 24)
    torch.testing.assert_close(cls, blocks[-1][:, 0], atol=1e-5, rtol=1e-5)
    assert last2.shape == (5, 48) and last3.shape == (5, 72)
    torch.testing.assert_close(last2, torch.cat([blocks[1][:, 0], blocks[2][:, 0]], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last3[:, :24], blocks[0][:, 0], atol=1e-5, rtol=1e-5)


def test_cls_avgpool_is_the_references_interleaved_layout(vit_and_images):
    model, images = vit_and_images
    with torch.no_grad():
        last = manual_vit_tokens(model, images)[-1]
        got = pool_features(model, images, "cls_avgpool")
    cls, avg = last[:, 0], last[:, 1:].mean(dim=1)
    assert got.shape == (5, 48)
    torch.testing.assert_close(got[:, 0::2], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1::2], avg, atol=1e-5, rtol=1e-5)


def test_gem_matches_the_formula(vit_and_images):
    model, images = vit_and_images
    with torch.no_grad():
        patches = manual_vit_tokens(model, images)[-1][:, 1:].double().numpy()  # (B, 16, D)
        got = pool_features(model, images, "gem").double().numpy()
    want = np.empty((5, 24))
    for i in range(5):
        for d in range(24):
            values = [max(v, 1e-6) ** 4 for v in patches[i, :, d]]
            want[i, d] = (sum(values) / len(values)) ** 0.25
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_multiscale_averages_three_scales_and_is_normalised(vit_and_images):
    model, images = vit_and_images
    with torch.no_grad():
        got = pool_features(model, images, "multiscale")
        total = torch.zeros(5, 24)
        for scale in (1.0, 1 / math.sqrt(2), 0.5):
            inp = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                            align_corners=False)
            side = inp.shape[-1] // 4 * 4  # 16, 11 -> 8, 8: the patch convolution floors
            total += manual_vit_tokens(model, inp[..., :side, :side])[-1][:, 0]
    want = total / 3
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(5))


def test_resnet_cls_is_the_pooled_2048_feature_and_token_poolings_refuse():
    torch.manual_seed(0)
    model = build_backbone("resnet50").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = pool_features(model, images, "cls")
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        want = x.mean(dim=(2, 3))
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, want)
    with pytest.raises(ValueError, match="'gem' needs a ViT"):
        pool_features(model, images, "gem")
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        pool_features(model, images, "avg")


def test_extract_precision_fp32_is_the_plain_forward_and_bf16_autocasts(vit_and_images):
    model, images = vit_and_images
    with torch.no_grad():
        plain = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images).float()
    for precision in ("fp32", "auto"):  # auto: fp32 on the CPU
        got, _, _ = extract_features(model, [images], "cls", precision=precision, progress=False)
        assert torch.equal(got, plain)
    got, _, _ = extract_features(model, [images], "cls", precision="bf16", progress=False)
    assert torch.equal(got, low) and not torch.equal(got, plain)
    torch.testing.assert_close(got, plain, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("batches_per_copy", [1, 2, 16])
def test_extract_features_restores_order_from_indices(vit_and_images, monkeypatch, batches_per_copy):
    """Also with the features copied back every batch, every 2 (3 batches: a full copy and the
    rest) and every 16 (all at the end)."""
    monkeypatch.setattr(extract, "BATCHES_PER_COPY", batches_per_copy)
    model, _ = vit_and_images
    torch.manual_seed(2)
    images = torch.randn(10, 3, 16, 16)
    permutation = [3, 7, 0, 9, 1, 4, 8, 2, 6, 5]
    batches = [
        (images[permutation[i:i + 4]], torch.tensor(permutation[i:i + 4]) * 10,
         torch.tensor(permutation[i:i + 4]), [f"k{j}" for j in permutation[i:i + 4]])
        for i in range(0, 10, 4)
    ]
    feats, labels, keys = extract_features(model, batches, "cls", progress=False)
    with torch.no_grad():
        want = model(images)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [10 * i for i in range(10)]
    assert keys == [f"k{i}" for i in range(10)]
    plain, no_labels, no_keys = extract_features(model, [images[:6], images[6:]], "last_blocks", 2, progress=False)
    assert plain.shape == (10, 48) and no_labels is None and no_keys is None
    with pytest.raises(ValueError, match="not a permutation"):
        extract_features(model, [(images[:2], torch.zeros(2), torch.tensor([0, 0]))], progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DISTRIBUTED_WORKER = """
import sys
from pathlib import Path
import torch
from stages.distributed import cleanup, init_distributed, get_rank, get_world_size
from stages.extract import extract_features

init_distributed(backend="gloo")
rank, world = get_rank(), get_world_size()
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
data = torch.arange(11 * 4, dtype=torch.float32).reshape(11, 4)
mine = list(range(rank, 11, world))  # strided: 6 and 5 samples, unequal counts
batches = [(data[mine[i:i + 2]], torch.tensor(mine[i:i + 2]), torch.tensor(mine[i:i + 2]),
            [f"s{j}" for j in mine[i:i + 2]]) for i in range(0, len(mine), 2)]
feats, labels, keys = extract_features(model, batches, "cls", progress=False)
torch.save({"feats": feats, "labels": labels, "keys": keys}, Path(sys.argv[1]) / f"rank{rank}.pt")
cleanup()
"""


@pytest.mark.timeout(180)
def test_distributed_extraction_gathers_in_original_order(tmp_path):
    import subprocess
    import sys

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", DISTRIBUTED_WORKER, str(tmp_path)], env=env,
                                      cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=170)
        assert proc.returncode == 0, err[-3000:]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        want = model(torch.arange(11 * 4, dtype=torch.float32).reshape(11, 4))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["feats"], want)
        assert got["labels"].tolist() == list(range(11))
        assert got["keys"] == [f"s{i}" for i in range(11)]


def test_features_round_trip_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float64)
    labels = np.arange(7) % 3
    keys = [f"key_{i}" for i in range(7)]
    meta = {"arch": "vit_small", "patch_size": 16, "pooling": "cls", "checkpoint_sha256": "ab" * 32}
    write_features(tmp_path / "train", torch.from_numpy(feats), labels, keys, meta)
    got_feats, got_labels, got_keys, got_meta = read_features(tmp_path / "train")
    assert got_feats.dtype == np.float32 and got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_feats, feats.astype(np.float32))
    np.testing.assert_array_equal(got_labels, labels)
    assert got_keys == keys
    assert got_meta == {**meta, "n": 7, "dim": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temp leftovers

    with pytest.raises(ValueError, match="6 keys for 7 feature rows"):
        write_features(tmp_path / "bad", feats, labels, keys[:6], meta)
    with pytest.raises(ValueError, match=r"labels must have shape \(7,\)"):
        write_features(tmp_path / "bad", feats, labels[:5], keys, meta)
    with pytest.raises(ValueError, match="non-finite feature in row 2"):
        write_features(tmp_path / "bad", np.where(np.arange(7)[:, None] == 2, np.nan, feats), labels, keys, meta)
    assert not (tmp_path / "bad").exists()

    split = tmp_path / "train"
    (split / "keys.txt").write_text("a\nb\n")
    with pytest.raises(FeaturesError, match=r"train/keys.txt: 2 keys for 7 rows"):
        read_features(split)
    (split / "keys.txt").write_text("".join(f"{k}\n" for k in keys))
    np.save(split / "features.npy", np.zeros((7, 4), dtype=np.float32))
    with pytest.raises(FeaturesError, match=r"meta.json: dim = 5 but .*features.npy has 4"):
        read_features(split)
    np.save(split / "features.npy", np.zeros((7, 5), dtype=np.float64))
    with pytest.raises(FeaturesError, match="features.npy: must be float32"):
        read_features(split)
    (split / "labels.npy").unlink()
    with pytest.raises(FeaturesError, match="labels.npy: missing"):
        read_features(split)
    with pytest.raises(FeaturesError, match="meta.json: missing"):
        read_features(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# end to end on the tiny digits shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_extracted(tmp_path_factory):
    """Tiny shards, a random teacher backbone saved as the pretrain stage exports it, and the
    extract stage run on them."""
    from stages.dino.backbones import build_backbone_from_params
    from stages.shard import run as shard_run

    root = tmp_path_factory.mktemp("tiny")
    params = validate_params(tiny_params(root, extract={"num_workers": 2, "batch_size": 32}))
    shard_run(params)
    torch.manual_seed(123)
    backbone = build_backbone_from_params(params.model, drop_path_rate=0.0)
    Path(params.paths.teacher_backbone).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher_backbone": backbone.state_dict()}, params.paths.teacher_backbone)
    summary = extract_run(params)
    return params, backbone.eval(), summary


def _eval_view(image: Image.Image, size: int) -> torch.Tensor:
    """The eval transform written out with PIL and numpy (square images: resize = crop)."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
    return torch.from_numpy(((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)).float()


def test_extract_stage_end_to_end(tiny_extracted):
    from stages.shard_format import decode_image, iter_samples

    params, backbone, summary = tiny_extracted
    features = Path(params.paths.features)
    assert sorted(p.name for p in features.iterdir()) == ["train", "val"]
    assert summary == {"n_train": 300.0, "n_val": 100.0, "dim": 32.0}
    for split, n in (("train", 300), ("val", 100)):
        feats, labels, keys, meta = read_features(features / split)
        samples = list(iter_samples(params.paths.shards, split))
        assert feats.shape == (n, 32)
        assert keys == [s.key for s in samples]  # shard order, although 2 workers read
        assert labels.tolist() == [s.label for s in samples]
        images = torch.stack([_eval_view(decode_image(s), 16) for s in samples[:: n // 7]])
        with torch.no_grad():
            want = backbone(images).numpy()
        np.testing.assert_allclose(feats[:: n // 7], want, atol=2e-4, rtol=1e-3)
        digest = __import__("hashlib").sha256(Path(params.paths.teacher_backbone).read_bytes()).hexdigest()
        assert meta["checkpoint_sha256"] == digest
        assert meta["arch"] == "vit_tiny" and meta["patch_size"] == 4 and meta["pooling"] == "cls"
        assert meta["crop_size"] == 16 and meta["num_classes"] == 10 and meta["split"] == split
        assert meta["precision"] == "fp32"  # auto, resolved on the CPU


def test_knn_stage_with_baselines(tiny_extracted, tmp_path):
    from stages.knn import knn_classify
    from stages.knn import run as knn_run
    from stages.shard_format import decode_image, iter_samples

    params, _, _ = tiny_extracted
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"metrics": str(tmp_path)})})
    metrics = knn_run(params)
    written = json.loads((tmp_path / "knn.json").read_text())
    assert written == metrics
    expected = {f"{prefix}top{t}_k{k}" for prefix in ("", "pixels_", "random_") for t in (1, 5) for k in (5, 10)}
    assert set(written) == expected | {"n_train", "n_val"}
    assert all(isinstance(v, float) for v in written.values())
    # The raw-pixel baseline recomputed here: PIL bicubic to 16x16, [0, 1], flattened.
    pixels = {}
    for split in ("train", "val"):
        samples = list(iter_samples(params.paths.shards, split))
        pixels[split] = (
            np.stack([np.asarray(decode_image(s).resize((16, 16), Image.BICUBIC), dtype=np.float32).ravel() / 255
                      for s in samples]),
            np.array([s.label for s in samples]),
        )
    for k in (5, 10):
        want = knn_classify(*pixels["train"], *pixels["val"], k=k, num_classes=10)
        assert written[f"pixels_top1_k{k}"] == pytest.approx(want["top1"], abs=1.01)  # resampling rounding
    assert written["pixels_top1_k10"] > 60  # digits are easy from pixels


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_dataset_splits_every_sample_once_over_ranks_and_workers(tiny_extracted, workers):
    from torch.utils.data import DataLoader

    from stages.extract import split_size

    params, _, _ = tiny_extracted
    for split in ("train", "val"):  # train: 3 shards (split by worker), val: 1 shard (strided)
        seen = []
        for rank in range(2):
            dataset = ShardImages(params.paths.shards, split, lambda image: torch.zeros(1), rank, 2)
            indices = [int(i) for _, _, batch, _ in DataLoader(dataset, batch_size=16, num_workers=workers)
                       for i in batch]
            assert all(i % 2 == rank for i in indices)
            seen += indices
        assert sorted(seen) == list(range(split_size(params.paths.shards, split)))


def test_extract_cli_reports_a_missing_checkpoint(tmp_path, caplog):
    from stages.extract import main
    from tiny_config import write_params

    path = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    with caplog.at_level("ERROR"):
        assert main(["--params", str(path)]) == 1
    assert "teacher_backbone.pth: teacher backbone not found" in caplog.text
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model": {"arch": "resnet50", "embed_dim": None, "depth": None, "num_heads": None},
          "extract": {"pooling": "gem"}}, "extract.pooling = 'gem' needs a ViT"),
        ({"extract": {"crop_size": 14, "resize": 14}}, "extract.crop_size = 14 is not a multiple of model.patch_size = 4"),
        ({"extract": {"pooling": "last_blocks", "n_last_blocks": 3}}, "extract.n_last_blocks = 3 exceeds the model's 2"),
    ],
)
def test_extract_refuses_inconsistent_params_before_any_work(tmp_path, overrides, message):
    from stages.cli import StageError

    params = validate_params(tiny_params(tmp_path, **overrides))
    with pytest.raises(StageError, match=message):
        extract_run(params)
    assert not Path(params.paths.features).exists()
