"""The one typed schema of params.yaml, shared by every stage.

Defaults are the paper's / the reference implementation's (facebookresearch/dino, main_dino.py and
the eval scripts); params.yaml overrides them for the small embedded default. Every stage validates
the whole file before it writes anything; a bad file raises `ParamsError`, which the command line
turns into exit status 2 with a message naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator, ValidationInfo

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]

SOURCES_WITH_ROOT = ("fashion-mnist", "imagefolder", "cifar")


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message names the key and what is allowed."""


class Section(BaseModel):
    """Strict: unknown keys, wrong types and coercions from strings are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _lists_to_tuples(cls, value: Any) -> Any:
        # YAML has lists only; tuples keep sections frozen and hashable.
        return tuple(value) if isinstance(value, list) else value


def _crop_scale(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"must be (min, max) with 0 < min <= max <= 1, got {list(value)}")
    return value


def _blur_radius(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (0 < lo <= hi):
        raise ValueError(f"must be (min, max) pixels with 0 < min <= max, got {list(value)}")
    return value


class Paths(Section):
    """Every file and folder the DAG reads or writes; dvc.yaml and the Snakefile refer to these."""

    shards: str = "data/shards/fmnist"
    checkpoints: str = "checkpoints"
    teacher_backbone: str = "models/teacher_backbone.pth"
    features: str = "features/fmnist"
    metrics: str = "metrics"
    plots: str = "plots"
    dvclive: str = "dvclive"
    logs: str = "logs"  # Snakemake's per-rule log files (logs/<rule>.log)
    linear: str = "models/linear"  # linear-evaluation checkpoint folder (resumable, persisted)
    fewshot_subsets: str = "metrics/fewshot_subsets.json"  # the few-shot labelled subsets (keys)
    transfer: str = "models/transfer"  # fine-tuning checkpoint folder (resumable, persisted)
    report: str = "report"  # the report stage's folder: index.html, summary.md, figures


class Dataset(Section):
    """The source dataset and how it becomes shards (stage `shard`)."""

    source: Literal["fashion-mnist", "digits", "imagefolder", "cifar"] = "fashion-mnist"
    root: str | None = "/usr/share/datasets/fashion-mnist"
    subset: dict[Literal["train", "val"], PositiveInt | None] = Field(
        default_factory=lambda: {"train": None, "val": None}
    )
    seed: int = 0
    val_fraction: Fraction = 0.2  # for sources without an official split (digits)
    shard_max_samples: PositiveInt = 10000
    shard_max_bytes: PositiveInt = 1 << 30
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95  # only when re-encoding to jpg
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    num_workers: NonNegInt = 0  # processes decoding/encoding images; 0 = in the stage's process

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if source in SOURCES_WITH_ROOT:
            if root is None:
                raise ValueError(f"required for source {source!r}")
            if not Path(root).is_dir():
                raise ValueError(f"no such directory (needed by source {source!r})")
        return root


#: The reference's named ViT sizes: (embed_dim, depth, num_heads).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class Model(Section):
    """The backbone, named as in the reference (vit_tiny/small/base + patch_size, resnet50).

    embed_dim/depth/num_heads override the named size for tiny CPU models; None keeps the
    reference's (192/384/768 dims, 3/6/12 heads, depth 12).
    """

    arch: Literal["vit_tiny", "vit_small", "vit_base", "resnet50"] = "vit_small"
    patch_size: PositiveInt = 16
    img_size: PositiveInt = 224
    in_chans: PositiveInt = 3
    embed_dim: PositiveInt | None = None
    depth: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1  # student only

    @model_validator(mode="after")
    def _buildable(self) -> "Model":
        if self.in_chans != 3:
            raise ValueError(f"model.in_chans = {self.in_chans}: every stage feeds the backbone RGB images "
                             "(3 channels; grayscale sources are converted)")
        if self.arch == "resnet50":
            return self
        dim, _, heads = VIT_SIZES[self.arch]
        dim, heads = self.embed_dim or dim, self.num_heads or heads
        if dim % heads:
            raise ValueError(f"model.num_heads = {heads} must divide model.embed_dim = {dim} ({self.arch})")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size = {self.img_size} is not a multiple of model.patch_size = "
                             f"{self.patch_size}")
        return self


class Pretrain(Section):
    """DINO pretraining (stage `pretrain`); defaults as main_dino.py."""

    epochs: PositiveInt = 100
    batch_size_per_gpu: PositiveInt = 64
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: NonNegInt = 10
    # head and loss
    out_dim: PositiveInt = 65536
    head_hidden_dim: PositiveInt = 2048
    head_bottleneck_dim: PositiveInt = 256
    head_nlayers: Annotated[int, Field(ge=1)] = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    warmup_teacher_temp: PositiveFloat = 0.04
    teacher_temp: PositiveFloat = 0.04
    warmup_teacher_temp_epochs: NonNegInt = 0
    student_temp: PositiveFloat = 0.1
    center_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    momentum_teacher: Annotated[float, Field(ge=0, le=1)] = 0.996
    # optimisation
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: PositiveFloat = 0.0005  # at global batch 256; scaled linearly
    min_lr: NonNegFloat = 1e-6
    warmup_epochs: NonNegInt = 10
    weight_decay: NonNegFloat = 0.04
    weight_decay_end: NonNegFloat = 0.4
    clip_grad: NonNegFloat = 3.0  # per parameter tensor; 0 disables
    freeze_last_layer: NonNegInt = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the backbones (GPU speed; same semantics)
    # record the whole step as one CUDA graph and replay it (GPU speed: no per-kernel host cost;
    # same semantics; one process, AdamW, bf16/fp32)
    cuda_graphs: bool = False
    # multi-crop: "pil" per sample in loader workers (the reference's PIL operations, uint8 views
    # normalised on the device), or "batch" on uint8 tensors on the training device (same
    # distribution; for fixed-size images)
    augment: Literal["pil", "batch"] = "pil"
    # processes sharing this machine's cores when training on the CPU without a launcher (torchrun
    # or srun): the stage starts them itself with torchrun, each with cores / N threads and
    # batch_size_per_gpu images. Small models train ~1.3x faster as 2 single-threaded processes
    # than as one process with 2 threads (most of their kernels are too small to split).
    cpu_processes: PositiveInt = 1
    # with `augment: batch`, training images decoded once into memory on the training device when
    # they take at most this many MiB (Fashion-MNIST: 45), instead of read and decoded every
    # epoch by the loader workers; the same batches either way (0: never)
    decoded_cache_mib: NonNegInt = 1024
    global_crops_number: Annotated[int, Field(ge=1, le=2)] = 2
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: NonNegInt = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    global_crops_size: PositiveInt = 224
    local_crops_size: PositiveInt = 96
    # Gaussian blur radius range in pixels; the paper's (0.1, 2.0) is for 224² views (a radius
    # of 2 erases most of a 28² image)
    blur_radius: tuple[float, float] = (0.1, 2.0)
    # ablations (paper Tables 7, 14, 15)
    teacher: Literal["ema", "student", "previous_epoch"] = "ema"
    loss: Literal["ce", "mse"] = "ce"
    predictor: bool = False
    teacher_output: Literal["centering", "softmax", "sinkhorn"] = "centering"
    # DINOv2's KoLeo term on the student's CLS features of each global view, times this weight
    # (DINOv2: 0.1; DINO: 0, off)
    koleo_weight: NonNegFloat = 0.0
    # checkpoints, logging, safety
    checkpoint_every_steps: NonNegInt = 0  # 0: only at each epoch's end
    # write checkpoints from a copy of the state in a background thread, while training goes on
    async_checkpoint: bool = True
    log_every_steps: PositiveInt = 10
    collapse_patience_steps: NonNegInt = 200  # 0 disables the collapse guard
    stop_on_collapse: bool = False
    on_preempt: Literal["requeue", "exit"] = "requeue"  # SIGTERM/SIGUSR1: checkpoint, then this
    inject_nonfinite_at_step: NonNegInt | None = None  # fault tests only

    _scales = field_validator("global_crops_scale", "local_crops_scale")(_crop_scale)
    _blur = field_validator("blur_radius")(_blur_radius)

    @model_validator(mode="after")
    def _consistent(self) -> "Pretrain":
        if self.min_lr > self.lr:
            raise ValueError(f"pretrain.min_lr = {self.min_lr} must be <= pretrain.lr = {self.lr}")
        for key in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            if getattr(self, key) > self.epochs:
                raise ValueError(f"pretrain.{key} = {getattr(self, key)} must be <= pretrain.epochs = {self.epochs}")
        if self.global_crops_number + self.local_crops_number < 2:
            raise ValueError(f"pretrain.global_crops_number = {self.global_crops_number} and local_crops_number = "
                             f"{self.local_crops_number}: the loss needs at least two views")
        return self


class Extract(Section):
    """Frozen teacher features (stage `extract`); defaults as eval_knn.py."""

    resize: PositiveInt = 256
    crop_size: PositiveInt = 224
    pooling: Literal["cls", "last_blocks", "cls_avgpool", "gem", "multiscale"] = "cls"
    n_last_blocks: PositiveInt = 4
    batch_size: PositiveInt = 128
    num_workers: NonNegInt = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPUs with native bf16 (fast), else fp32; fp32: the reference's features
    # (eval_knn.py runs the model in fp32)
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class Knn(Section):
    """Weighted k-NN (paper Appendix F.1)."""

    k: tuple[PositiveInt, ...] = (10, 20, 100, 200)
    temperature: PositiveFloat = 0.07
    baselines: bool = True  # also raw pixels and a randomly initialised backbone


class Retrieval(Section):
    """Image retrieval on Revisited Oxford/Paris (stage `retrieval`); defaults as the reference's
    eval_image_retrieval.py (ViT-S/16: imsize 224, single scale, full query images)."""

    root: str | None = None  # holds roxford5k/ and rparis6k/; None: the generated fixture
    fixture: str = "data/fixtures/revisitop"  # where `python -m stages.fixtures.retrieval` writes
    datasets: tuple[Literal["roxford5k", "rparis6k"], ...] = ("roxford5k", "rparis6k")
    imsize: PositiveInt = 224  # longer image side (PIL thumbnail, as the reference)
    multiscale: bool = False  # CLS averaged over scales 1, 1/sqrt(2), 1/2
    crop_queries: bool = False  # crop queries to their bbx (revisitop protocol; the reference does not)
    distractors: str | None = None  # a folder of images appended to every database (e.g. R1M)
    kappas: tuple[PositiveInt, ...] = (1, 5, 10)  # mP@k
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: NonNegInt = 10


class Copydetect(Section):
    """Copy detection on Copydays (stage `copydetect`); defaults as the reference's
    eval_copy_detection.py (ViT-B/8 at 320 px in the paper)."""

    root: str | None = None  # holds original/, strong/, jpegqual/<q>/, crops/<c>/; None: the fixture
    fixture: str = "data/fixtures/copydays"  # where `python -m stages.fixtures.copydays` writes
    imsize: PositiveInt = 320  # images resized to imsize x imsize (bicubic)
    distractors: str | None = None  # a folder of images added to the database (paper: 10k YFCC100M)
    whitening: str | None = None  # a folder of images to learn PCA whitening on (paper: 20k YFCC100M)
    # whitening from the covariance of the centred features instead of the reference's uncentred
    # second-moment matrix (the paper's numbers use the latter)
    whitening_centred: bool = False
    topk: PositiveInt = 20  # results per query the AP is computed over
    batch_size: PositiveInt = 128
    num_workers: NonNegInt = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Davis(Section):
    """DAVIS-2017 semi-supervised video object segmentation by label propagation (stage `davis`);
    defaults as the reference's eval_video_segmentation.py (frames: shorter side 480, longer side
    rounded down to a multiple of 64; the model's patch size)."""

    root: str | None = None  # holds JPEGImages/480p, Annotations/480p, ImageSets/2017; None: the fixture
    fixture: str = "data/fixtures/davis"  # where `python -m stages.fixtures.davis` writes
    results: str = "results/davis"  # predicted palette PNGs, <results>/<sequence>/<frame>.png
    n_last_frames: NonNegInt = 7  # previous frames (predicted soft masks) in the context
    size_mask_neighborhood: NonNegInt = 12  # source window +-N patches around a target patch; 0: all
    topk: PositiveInt = 5  # strongest sources kept per target patch
    temperature: PositiveFloat = 0.1  # affinity exp(cos / temperature)
    # void (255) annotation pixels: false counts them as background, as the DAVIS-2017 toolkit's
    # published numbers (its loader zeroes them); true leaves them out of J and F
    exclude_void: bool = False
    short_side: PositiveInt = 480  # frames resized so that the shorter side is this
    long_side_multiple: PositiveInt = 64  # ... and the longer side rounded down to a multiple of this
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Linear(Section):
    """Linear evaluation on frozen features (paper Sec. 4.1, Table 2); defaults as eval_linear.py.

    ``mode: full`` trains on augmented images through the frozen backbone every epoch, as the
    paper; ``mode: features`` trains on the extract stage's cached features (no augmentation), for
    small compute. ``batch_size`` is global (the reference: 128 per GPU x 8 GPUs); the learning
    rate is ``lr * batch_size / 256``. Features: the CLS tokens of the last ``n_last_blocks``
    blocks (ViT-S: 4), or with ``avgpool_patchtokens`` the CLS and the mean patch token of the
    last block (ViT-B: n_last_blocks 1).
    """

    mode: Literal["full", "features"] = "full"
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 1024  # global, over all ranks
    lr: PositiveFloat = 0.001  # at batch 256, scaled linearly; cosine to 0 over the epochs
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 0.0
    n_last_blocks: PositiveInt = 4
    avgpool_patchtokens: bool = False
    train_crop_size: PositiveInt = 224  # RandomResizedCrop side (mode full)
    resize: PositiveInt = 256  # evaluation: resize the shorter side (bicubic) ...
    crop_size: PositiveInt = 224  # ... then center crop
    val_freq: PositiveInt = 1  # epochs between evaluations (the last epoch always)
    seed: int = 0
    num_workers: NonNegInt = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _pooling(self) -> "Linear":
        if self.avgpool_patchtokens and self.n_last_blocks != 1:
            raise ValueError(
                f"linear.avgpool_patchtokens = true needs linear.n_last_blocks = 1 (CLS + average-pooled "
                f"patch tokens of the last block, the paper's ViT-B setting), got {self.n_last_blocks}"
            )
        return self


class Fewshot(Section):
    """Logistic regression on frozen features with a fraction of the train labels (Table 12).

    sklearn's multinomial LogisticRegression (L-BFGS) with an L2 penalty of inverse strength ``C``
    on L2-normalised features; per class ``max(1, round(fraction * n_class))`` labelled samples,
    drawn with ``seed`` (nested: the 1% subset lies inside the 10% one).
    """

    fractions: tuple[Fraction, ...] = (0.01, 0.1)
    seed: int = 0
    C: PositiveFloat = 1.0  # inverse L2 regularisation strength (sklearn's C)
    max_iter: PositiveInt = 1000  # L-BFGS iterations at most


class Attention(Section):
    """Self-attention maps of the last block's CLS token (Figs 1, 3) and their Jaccard index
    against PASCAL-VOC-layout masks (Fig. 4); defaults as visualize_attention.py."""

    images: str | None = None  # folder of images; None: scikit-image's astronaut, chelsea, coffee
    image_size: PositiveInt = 480  # images resized to image_size x image_size
    threshold: Fraction = 0.6  # attention mass the masks keep
    voc_root: str | None = None  # JPEGImages/ + SegmentationObject/ or SegmentationClass/; None: no Jaccard
    voc_split: str = "val"  # ImageSets/Segmentation/<split>.txt when present, else every mask
    max_images: PositiveInt | None = None  # VOC images evaluated at most (None: all)
    baselines: bool = True  # also the Jaccard of a randomly initialised backbone
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("images", "voc_root")
    @classmethod
    def _folder_exists(cls, folder: str | None) -> str | None:
        if folder is not None and not Path(folder).is_dir():
            raise ValueError("no such directory")
        return folder


class Tsne(Section):
    """t-SNE of the class-mean features (paper Appendix H, Fig. 11)."""

    pca_dim: PositiveInt = 30  # PCA before t-SNE (capped by the number of classes and dims)
    perplexity: PositiveFloat = 20.0  # capped at (n_classes - 1) / 3 for few classes
    max_iter: PositiveInt = 1000
    seed: int = 0
    normalize: bool = True  # L2-normalise each feature before the class means


class Transfer(Section):
    """Fine-tuning the pretrained backbone with a linear classifier (paper Sec. 4.2.3, Table 6).

    The paper follows DeiT's fine-tuning protocol (Touvron et al. 2021); the defaults are DeiT's
    (AdamW, lr 5e-4 at batch 512 scaled linearly, weight decay 0.05, cosine to 1e-5 after 5 warm-up
    epochs from 1e-6, label smoothing 0.1, RandAugment m9 n2, Mixup 0.8 / CutMix 1.0, stochastic
    depth 0.1) with the batch size (768) and epochs (1000) the authors gave for CIFAR. Their
    per-dataset learning rates (CIFAR-10: 7.5e-6, CIFAR-100: 5e-6 at batch 768; iNaturalist:
    5e-5 before scaling, 300 epochs) are values to set here. ``dataset`` None fine-tunes on the
    project's own shards (paths.shards, train/val); otherwise the source is read in place
    (cifar pickles, or an imagefolder tree for Flowers, Cars, iNaturalist).
    """

    dataset: Dataset | None = None  # None: paths.shards (train -> val)
    epochs: PositiveInt = 1000
    batch_size: PositiveInt = 768  # global, over all ranks
    lr: PositiveFloat = 0.0005  # at global batch 512, scaled linearly (DeiT)
    min_lr: NonNegFloat = 1e-5  # end of the cosine schedule
    warmup_epochs: NonNegInt = 5
    warmup_lr: NonNegFloat = 1e-6  # learning rate at the start of the warm-up
    weight_decay: NonNegFloat = 0.05  # weights only; biases, norms, pos_embed and cls_token: 0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1
    mixup: NonNegFloat = 0.8  # Beta(alpha, alpha) of Mixup; 0 disables
    cutmix: NonNegFloat = 1.0  # Beta(alpha, alpha) of CutMix; 0 disables
    mixup_switch_prob: Fraction = 0.5  # chance of CutMix instead of Mixup when both are on
    randaugment_ops: NonNegInt = 2  # torchvision RandAugment num_ops; 0 disables
    randaugment_magnitude: Annotated[int, Field(ge=0, le=30)] = 9
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_size: PositiveInt = 224  # training crop and evaluation center crop
    resize: PositiveInt = 256  # evaluation: shorter side (bicubic), then the center crop
    val_freq: PositiveInt = 1  # epochs between evaluations (the last epoch always)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    num_workers: NonNegInt = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _scale = field_validator("crop_scale")(_crop_scale)

    @model_validator(mode="after")
    def _consistent(self) -> "Transfer":
        if self.min_lr > self.lr:
            raise ValueError(f"transfer.min_lr = {self.min_lr} must be <= transfer.lr = {self.lr}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"transfer.warmup_epochs = {self.warmup_epochs} must be <= transfer.epochs = "
                             f"{self.epochs}")
        return self


REPORT_STAGES = ("pretrain", "knn", "linear", "fewshot", "retrieval", "copydetect", "davis", "transfer",
                 "attention", "tsne")


class Report(Section):
    """The report (stage `report`): which stages' metrics files (<paths.metrics>/<stage>.json) it
    reads; a listed file that does not exist is shown as "not run"."""

    inputs: tuple[Literal[REPORT_STAGES], ...] = REPORT_STAGES  # type: ignore[valid-type]
    title: str = "DINO: emerging properties in self-supervised vision transformers"


class RuleResources(Section):
    """What one Snakemake rule asks the scheduler for (the SLURM executor plugin's resources).

    Locally only `cpus_per_task` matters (it becomes the rule's threads, capped by --cores).
    None for `slurm_partition`/`slurm_extra` leaves the profile's default-resources in force.
    """

    nodes: PositiveInt = 1
    tasks_per_node: PositiveInt = 1  # > 1 (or nodes > 1): one process per task via srun
    gpus_per_node: NonNegInt = 0  # requested as --gres=gpu:N
    cpus_per_task: PositiveInt = 2
    mem_mb: PositiveInt = 8000  # per node
    runtime: PositiveInt = 60  # minutes
    slurm_partition: str | None = None
    slurm_extra: str | None = None  # extra sbatch flags, e.g. "--qos=normal"


def _gpu_job(cpus_per_task: int, mem_mb: int, runtime: int) -> RuleResources:
    return RuleResources(
        gpus_per_node=1, cpus_per_task=cpus_per_task, mem_mb=mem_mb, runtime=runtime, slurm_partition="gpu"
    )


class Resources(Section):
    """Scheduler resources per Snakemake rule (DVC ignores this section; no stage reads it).

    `launcher: auto` runs a multi-task rule (nodes * tasks_per_node > 1) as `srun python -m ...`
    inside a SLURM allocation and as plain `python -m ...` elsewhere; `python` never uses srun.
    A rule without an entry here gets RuleResources' defaults.
    """

    launcher: Literal["auto", "python"] = "auto"
    shard: RuleResources = Field(default_factory=RuleResources)
    pretrain: RuleResources = Field(default_factory=lambda: _gpu_job(10, 64000, 1440))
    extract: RuleResources = Field(default_factory=lambda: _gpu_job(4, 32000, 60))
    knn: RuleResources = Field(default_factory=lambda: RuleResources(mem_mb=16000))
    linear: RuleResources = Field(default_factory=lambda: _gpu_job(10, 32000, 1440))
    transfer: RuleResources = Field(default_factory=lambda: _gpu_job(10, 32000, 1440))


class Params(Section):
    paths: Paths = Field(default_factory=Paths)
    dataset: Dataset = Field(default_factory=Dataset)
    model: Model = Field(default_factory=Model)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    extract: Extract = Field(default_factory=Extract)
    knn: Knn = Field(default_factory=Knn)
    linear: Linear = Field(default_factory=Linear)
    fewshot: Fewshot = Field(default_factory=Fewshot)
    attention: Attention = Field(default_factory=Attention)
    tsne: Tsne = Field(default_factory=Tsne)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    copydetect: Copydetect = Field(default_factory=Copydetect)
    davis: Davis = Field(default_factory=Davis)
    transfer: Transfer = Field(default_factory=Transfer)
    report: Report = Field(default_factory=Report)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _sections_are_mappings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"the top level must be a mapping of sections, got {type(data).__name__}")
        return data


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


def _describe(error: dict, source: str) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, str) or not p.startswith("function-"))
    key = ".".join(str(p) for p in loc if p != "[key]") or "(top level)"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{source}: unknown key {key!r}{hint} Allowed here: {', '.join(allowed)}"
    msg = error["msg"].removeprefix("Value error, ")
    shown = "" if error["type"] == "missing" else f" = {value!r}"
    return f"{source}: {key}{shown}: {msg}"


def validate_params(data: Any, source: str = "params") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming every bad key."""
    try:
        return Params.model_validate(data if data is not None else {})
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(data, str(path))
