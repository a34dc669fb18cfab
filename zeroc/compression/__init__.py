"""ZeroC compression: calibrated low-rank Q/K/V folded into the model's weights (`fold.py`),
with ranks chosen per layer under a KV budget from measured sensitivity (`calibrate.py`: each cut's
KL from `divergence.py`; layer by layer with a local proxy for large models, `layerwise.py`)."""
