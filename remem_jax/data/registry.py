"""Dataset registry: our dataset names -> where the data lives, its splits, classes and metric.

Every dataset of ReMem Table 5 is here, plus CIFAR-10, the offline ``digits`` set, a user's
``image_folder`` and ImageNet-LT. Split choices (TFDS split strings) reproduce the train/test sizes
of Table 5; where TFDS has no test split, the split we evaluate on is written next to the entry.

* ``sun397`` is the Kornblith et al. (2018) split: the first of the ten official SUN397
  partitions (50 train / 50 test images per class = 19,850 / 19,850), which TFDS ships as the
  config ``sun397/standard-part1-120k``.
* ``sun397_tfds`` is the TFDS default ``sun397/tfds`` partition (train 76,128 / validation 10,875 /
  test 21,750). Table 5 reports 76,128 / 10,875, i.e. the paper evaluates on TFDS *validation*; so
  do we (``sun397_tfds_test`` evaluates on the 21,750-image test split instead).
* ``eurosat`` / ``resisc45`` have only a TFDS ``train`` split; Table 5 gives an 80/20 split
  (21,600/5,400 and 25,200/6,300), so we train on ``train[:80%]`` and test on ``train[80%:]``.
* ``oxford_flowers102`` trains on ``train+validation`` (2,040) and tests on ``test`` (6,149).
* ``food101``, ``diabetic_retinopathy_detection``, ``i_naturalist2017`` and ``imagenet2012`` are
  evaluated on the TFDS ``validation`` split (their Table 5 test sizes).
* ``imagenet_lt`` is ImageNet-LT (Liu et al. 2019) defined by its published list files over
  ImageNet-2012 (115,846 train / 20,000 val); ``imagenet_lt_tfds`` uses the TFDS ``imagenet_lt``
  builder instead (same lists, downloaded by TFDS).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

METRICS = ("top1", "mean_per_class")
# How `DatasetSpec.paper_results` reads (the ReMem paper's student and teacher accuracy).
PAPER_RESULTS_FORMAT = "student | teacher top-1 or mean per-class (the dataset's metric) in %, KD unless stated"
KINDS = ("tfds", "digits", "image_folder", "imagenet_lt")

_IMAGENET_MANUAL = (
    "ImageNet-2012 needs a manual download: register at https://image-net.org/download-images, "
    "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <manual_dir> and run "
    "`tfds build imagenet2012 --manual_dir=<manual_dir> --data_dir=<data_dir>`.")


class UnknownDatasetError(KeyError):
    """Raised for a dataset name that is not in the registry."""

    def __str__(self):  # KeyError would print the message with quotes around it.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of one dataset.

    Attributes:
      name: our name (the registry key).
      kind: 'tfds', 'digits' (offline), 'image_folder' (user folders) or 'imagenet_lt' (list files
        over imagenet2012).
      tfds_name: TFDS builder name including its config, e.g. 'sun397/standard-part1-120k'.
      train_split: split string used for training (TFDS syntax for kind 'tfds').
      eval_split: split string used for evaluation.
      num_classes: number of classes, or None when it is only known at run time (image_folder).
      metric: 'top1' or 'mean_per_class' (Table 5 of ReMem).
      manual_download: None, or what the user must download by hand and where to put it.
      paper_sizes: (train, test) sizes of ReMem Table 5, for documentation and sanity checks.
      note: one line on the split choice.
      paper_results: what the ReMem paper reports on this dataset, in the form of
        `PAPER_RESULTS_FORMAT`; None where the paper gives none or its numbers (ReMem Table 1)
        were lost in extraction.
    """

    name: str
    kind: str
    tfds_name: Optional[str]
    train_split: str
    eval_split: str
    num_classes: Optional[int]
    metric: str
    manual_download: Optional[str] = None
    paper_sizes: Optional[tuple[int, int]] = None
    note: str = ""
    paper_results: Optional[str] = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"DatasetSpec {self.name!r}: metric must be one of {METRICS}, "
                             f"got {self.metric!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec {self.name!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}.")


def _tfds(name, tfds_name, train, test, classes, metric="top1", manual=None, sizes=None, note="",
          results=None):
    return DatasetSpec(name=name, kind="tfds", tfds_name=tfds_name, train_split=train,
                       eval_split=test, num_classes=classes, metric=metric,
                       manual_download=manual, paper_sizes=sizes, note=note, paper_results=results)


_SPECS = (
    _tfds("cifar10", "cifar10", "train", "test", 10, sizes=(50_000, 10_000)),
    _tfds("cifar100", "cifar100", "train", "test", 100, sizes=(50_000, 10_000),
          results=("Table 8 (DIST): vanilla 80.7 | 93.4, ReMem 82.9 | 89.3; "
                   "Table 9 (LoRA): 82.0 | 93.1, LoRA+ReMem 83.4 | 91.6")),
    _tfds("food101", "food101", "train", "validation", 101, sizes=(75_750, 25_250),
          note="TFDS has no test split; its validation split is the official test set."),
    _tfds("sun397", "sun397/standard-part1-120k", "train", "test", 397, sizes=(19_850, 19_850),
          note="Kornblith et al. split = official partition 1 (50/50 images per class)."),
    _tfds("sun397_tfds", "sun397/tfds", "train", "validation", 397, "mean_per_class",
          sizes=(76_128, 10_875),
          note="TFDS default partition; Table 5's 10,875 test images are TFDS validation.",
          results=("Table 8 (DIST): vanilla 65.8 | 77.3, ReMem 68.0 | 74.6; "
                   "Table 9 (LoRA): 65.5 | 76.8, LoRA+ReMem 67.6 | 76.5")),
    _tfds("sun397_tfds_test", "sun397/tfds", "train", "test", 397, "mean_per_class",
          sizes=(76_128, 21_750), note="TFDS default partition evaluated on its test split."),
    _tfds("cars196", "cars196", "train", "test", 196, sizes=(8_144, 8_041)),
    _tfds("caltech101", "caltech101", "train", "test", 102, "mean_per_class",
          sizes=(3_060, 6_084), note="102 classes including the background class.",
          results=("Table 8 (DIST): vanilla 57.6 | 90.2, ReMem 78.1 | 88.5; "
                   "Table 9 (LoRA): 56.7 | 96.0, LoRA+ReMem 78.8 | 88.5")),
    _tfds("oxford_flowers102", "oxford_flowers102", "train+validation", "test", 102,
          "mean_per_class", sizes=(2_040, 6_149)),
    _tfds("oxford_iiit_pet", "oxford_iiit_pet", "train", "test", 37, sizes=(3_680, 3_669)),
    _tfds("dtd", "dtd", "train", "test", 47, sizes=(1_880, 1_880),
          note="DTD partition 1; the TFDS validation split (1,880) is unused."),
    _tfds("svhn_cropped", "svhn_cropped", "train", "test", 10, sizes=(73_257, 26_032),
          note="The 'extra' split is unused."),
    _tfds("patch_camelyon", "patch_camelyon", "train", "test", 2, sizes=(262_144, 32_768),
          results=("Table 8 (DIST): vanilla 91.8 | 91.5, ReMem 91.2 | 91.8; "
                   "Table 9 (LoRA): 89.3 | 89.2, LoRA+ReMem 90.7 | 90.6")),
    _tfds("diabetic_retinopathy_detection", "diabetic_retinopathy_detection/btgraham-300",
          "train", "validation", 5, sizes=(35_126, 10_906),
          manual=("Kaggle download: get train/test images and trainLabels.csv from "
                  "https://www.kaggle.com/c/diabetic-retinopathy-detection/data, unzip them into "
                  "<manual_dir> (train/, test/, trainLabels.csv, and retinopathy_solution.csv "
                  "for the test labels) and run `tfds build "
                  "diabetic_retinopathy_detection/btgraham-300 --manual_dir=<manual_dir> "
                  "--data_dir=<data_dir>`."),
          note="VTAB's btgraham-300 preprocessing; Table 5's 10,906 test = TFDS validation."),
    _tfds("eurosat", "eurosat/rgb", "train[:80%]", "train[80%:]", 10, sizes=(21_600, 5_400),
          note="TFDS has one 27,000-image split; 80/20 as Table 5."),
    _tfds("resisc45", "resisc45", "train[:80%]", "train[80%:]", 45, sizes=(25_200, 6_300),
          manual=("Manual download: get NWPU-RESISC45.rar (link on "
                  "https://gcheng-nwpu.github.io/#Datasets), extract it so that "
                  "<manual_dir>/NWPU-RESISC45/<class>/*.jpg exists and run `tfds build resisc45 "
                  "--manual_dir=<manual_dir> --data_dir=<data_dir>`."),
          note="TFDS has one 31,500-image split; 80/20 as Table 5."),
    _tfds("i_naturalist2017", "i_naturalist2017", "train", "validation", 5_089, "mean_per_class",
          sizes=(579_184, 95_986),
          note="About 200 GB download; Table 5 test = TFDS validation.",
          results=("Table 8 (DIST): vanilla 39.4 | 64.0, ReMem 41.6 | 62.9; "
                   "Table 9 (LoRA): 42.0 | 61.2, LoRA+ReMem 43.0 | 59.1")),
    _tfds("imagenet2012", "imagenet2012", "train", "validation", 1_000,
          manual=_IMAGENET_MANUAL, sizes=(1_281_167, 50_000)),
    _tfds("imagenet_lt_tfds", "imagenet_lt", "train", "validation", 1_000,
          manual=_IMAGENET_MANUAL.replace("imagenet2012 --", "imagenet_lt --"),
          sizes=(115_846, 20_000),
          note="TFDS imagenet_lt builder (downloads the list files itself)."),
    DatasetSpec(
        name="imagenet_lt", kind="imagenet_lt", tfds_name="imagenet2012",
        train_split="imagenet_lt_train_list", eval_split="imagenet_lt_eval_list",
        num_classes=1_000, metric="top1", manual_download=_IMAGENET_MANUAL,
        paper_sizes=(115_846, 20_000),
        note=("Subset of imagenet2012 given by ImageNet_LT_train.txt / ImageNet_LT_val.txt "
              "(config.data.imagenet_lt_train_list / _eval_list)."),
        paper_results=("Table 8 (DIST): vanilla 40.5 | 75.1, ReMem 44.3 | 57.2; "
                       "Table 9 (LoRA): 43.1 | 76.8, LoRA+ReMem 46.4 | 69.6")),
    DatasetSpec(
        name="digits", kind="digits", tfds_name=None, train_split="train", eval_split="test",
        num_classes=10, metric="top1",
        note="scikit-learn's bundled 1,797 handwritten digits; no download."),
    DatasetSpec(
        name="image_folder", kind="image_folder", tfds_name=None, train_split="train",
        eval_split="test", num_classes=None, metric="top1",
        note="config.data.image_folder/{train,test}/<class>/*.{jpg,jpeg,png}."),
)

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def known_datasets() -> tuple[str, ...]:
    """Returns the sorted names of all registered datasets."""
    return tuple(sorted(REGISTRY))


def get_spec(name: str) -> DatasetSpec:
    """Returns the spec of dataset `name`.

    Args:
      name: a registry name, e.g. 'cifar100', 'sun397', 'digits', 'image_folder', 'imagenet_lt'.

    Returns:
      The DatasetSpec.

    Raises:
      UnknownDatasetError: for an unknown name; the message lists the known names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(known_datasets())}. "
            "For your own images use 'image_folder' and set config.data.image_folder."
        ) from None
