"""Evaluation: perplexity (`perplexity.py`), model size (`footprint.py`), reports (`report.py`).

Import from the submodules (``from quantkit.eval.perplexity import perplexity``): re-exporting the
functions here would hide the submodules of the same names.
"""
