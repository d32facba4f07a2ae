"""SmoothQuant tested for real: the bundled target given the activation outliers of large models.

``inject_activation_outliers`` multiplies 4 channels of every attention/MLP input norm by 64 and
divides the matching weight columns by 64: the float model is unchanged, but per-token INT8
activations now lose most of their precision to the outlier channels. Naive W8A8 must lose clearly
more perplexity than SmoothQuant W8A8, which must stay within 1% of the float model.
"""

import pytest
import torch

from quantkit.compress import compress
from quantkit.eval.perplexity import perplexity
from quantkit.models.loading import load_model
from quantkit.quant.smoothquant_outliers import inject_activation_outliers
from quantkit.recipe import recipe_from_dict

WINDOWS = 12


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    loaded = load_model(None, dtype="float32")
    ids = torch.arange(64).reshape(1, 64)
    with torch.no_grad():
        before = loaded.model(ids).logits
    channels = inject_activation_outliers(loaded.model, loaded.adapter, channels=4, factor=64.0)
    with torch.no_grad():
        after = loaded.model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the same function
    norm = loaded.model.model.layers[3].post_attention_layernorm.weight
    assert float(norm[channels].abs().min()) > 10 * float(norm.abs().median())
    out = tmp_path_factory.mktemp("outlier") / "target-outliers"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def _ppl(path):
    from quantkit.data import evaluation_text

    loaded = load_model(str(path))
    return perplexity(loaded.model, loaded.tokenizer, evaluation_text("wikitext2"), max_windows=WINDOWS,
                      progress=False).perplexity


def test_smoothquant_rescues_w8a8_on_outlier_activations(outlier_model, tmp_path):
    calibration = {"dataset": "wikipedia", "num_samples": 8, "seq_len": 256, "seed": 0}
    naive = recipe_from_dict({"format": "compressed-tensors", "steps": [{"method": "w8a8"}]})
    smooth = recipe_from_dict({"format": "compressed-tensors", "calibration": calibration,
                               "steps": [{"method": "smoothquant", "alpha": 0.5}, {"method": "w8a8"}]})
    compress(str(outlier_model), naive, tmp_path / "naive")
    compress(str(outlier_model), smooth, tmp_path / "smooth")
    float_ppl = _ppl(outlier_model)
    naive_loss = _ppl(tmp_path / "naive") / float_ppl - 1
    smooth_loss = _ppl(tmp_path / "smooth") / float_ppl - 1
    assert smooth_loss < 0.01, (float_ppl, smooth_loss)
    assert naive_loss > 0.05 and naive_loss > 10 * max(smooth_loss, 0.001), (naive_loss, smooth_loss)
