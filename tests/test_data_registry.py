"""Registry tests (the config.data defaults are tested in test_configs.py)."""
import pytest
import tensorflow_datasets as tfds

from remem_jax.data import registry

TABLE5 = {  # name: (num_classes, metric) from ReMem Table 5.
    "food101": (101, "top1"), "cifar100": (100, "top1"), "sun397": (397, "top1"),
    "cars196": (196, "top1"), "caltech101": (102, "mean_per_class"),
    "oxford_flowers102": (102, "mean_per_class"), "oxford_iiit_pet": (37, "top1"),
    "dtd": (47, "top1"), "svhn_cropped": (10, "top1"), "sun397_tfds": (397, "mean_per_class"),
    "imagenet_lt": (1000, "top1"), "i_naturalist2017": (5089, "mean_per_class"),
    "patch_camelyon": (2, "top1"), "diabetic_retinopathy_detection": (5, "top1"),
    "eurosat": (10, "top1"), "resisc45": (45, "top1"),
}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_table5_entries(name):
    spec = registry.get_spec(name)
    assert (spec.num_classes, spec.metric) == TABLE5[name]
    assert spec.paper_sizes is not None


def test_extra_entries_and_manual_notes():
    for name in ("cifar10", "imagenet2012", "digits", "image_folder", "imagenet_lt"):
        assert name in registry.REGISTRY
    for name in ("resisc45", "diabetic_retinopathy_detection", "imagenet2012", "imagenet_lt"):
        assert "manual" in registry.get_spec(name).manual_download.lower() or \
            "register" in registry.get_spec(name).manual_download
    assert registry.get_spec("cifar100").manual_download is None


def test_tfds_names_and_configs_exist():
    """Every TFDS builder/config we name exists in the installed TFDS."""
    for spec in registry.REGISTRY.values():
        if spec.kind != "tfds":
            continue
        name, _, cfg = spec.tfds_name.partition("/")
        cls = tfds.builder_cls(name)
        if cfg:
            assert cfg in {c.name for c in cls.BUILDER_CONFIGS}, spec.tfds_name
    assert registry.get_spec("sun397").tfds_name == "sun397/standard-part1-120k"
    assert registry.get_spec("sun397_tfds").tfds_name == "sun397/tfds"


def test_unknown_name_lists_known():
    with pytest.raises(registry.UnknownDatasetError) as err:
        registry.get_spec("cifar1000")
    msg = str(err.value)
    assert "cifar1000" in msg and "cifar100" in msg and "oxford_flowers102" in msg
    assert isinstance(err.value, KeyError)


def test_paper_results_live_with_their_entry():
    with_results = {n for n, spec in registry.REGISTRY.items() if spec.paper_results is not None}
    assert with_results == {"caltech101", "cifar100", "i_naturalist2017", "imagenet_lt", "patch_camelyon",
                            "sun397_tfds"}
    for name in with_results:
        text = registry.get_spec(name).paper_results
        assert text.startswith("Table 8 (DIST): vanilla ") and "; Table 9 (LoRA): " in text, name
    assert registry.get_spec("cifar100").paper_results == (
        "Table 8 (DIST): vanilla 80.7 | 93.4, ReMem 82.9 | 89.3; Table 9 (LoRA): 82.0 | 93.1, LoRA+ReMem 83.4 | 91.6")


def test_readme_lists_the_paper_results_of_the_registry():
    import os
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    for name, spec in registry.REGISTRY.items():
        if spec.paper_results:
            assert f"- `{name}`: {spec.paper_results}." in readme, name
