"""Calibration and evaluation text: bundled data, local files, `datasets`, calibration samples."""

from quantkit.data.bundled import BUNDLED_DATASETS, heldout_titles
from quantkit.data.evaluation import evaluation_text
from quantkit.data.locations import DATA_DIR_ENV, calibration_data_dir
from quantkit.data.samples import calibration_samples
from quantkit.data.sources import load_texts

__all__ = [
    "BUNDLED_DATASETS",
    "DATA_DIR_ENV",
    "calibration_data_dir",
    "calibration_samples",
    "evaluation_text",
    "heldout_titles",
    "load_texts",
]
