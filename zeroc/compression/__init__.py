"""ZeroC compression: calibrated low-rank Q/K/V folded into the model's weights (`fold.py`),
with ranks chosen per layer under a KV budget from measured sensitivity (`calibrate.py`)."""
