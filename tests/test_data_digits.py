"""The offline digits dataset."""
import numpy as np

from remem_jax.data import digits, pipeline
from tests import helpers


def test_sizes_labels_and_pixels():
    splits = digits.load_digits_arrays(32, 0.25, 0)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    assert len(ytr) + len(yte) == 1797 and len(yte) == 450 and xte.shape == (450, 32, 32, 3)
    assert xtr.shape == (1347, 32, 32, 3) and xtr.dtype == np.uint8
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))
    assert xtr.max() == 255 and xtr.min() == 0 and 20 < xtr.mean() < 120 and xtr.std() > 50
    # Real scans: images of different classes differ, and RGB channels are equal (grey).
    m0, m1 = xtr[ytr == 0].mean(0), xtr[ytr == 1].mean(0)
    assert np.abs(m0 - m1).mean() > 10
    np.testing.assert_array_equal(xtr[..., 0], xtr[..., 2])
    np.testing.assert_array_equal(splits["test"][1],
                                  digits.load_digits_arrays(32, 0.25, 0)["test"][1])


def test_through_pipeline():
    cfg = helpers.data_config(image_size=24, digits_source_size=16)
    ev = pipeline.make_eval_data(cfg, "digits", global_batch_size=64)
    assert (ev.num_examples, ev.num_batches, ev.metric) == (450, 8, "top1")
    b = next(iter(ev))
    assert b["image"].shape == (8, 8, 24, 24, 3) and b["image"].std() > 0.3
    assert pipeline.num_train_examples(cfg, "digits") == 1347
    assert pipeline.get_num_classes(cfg, "digits") == 10
