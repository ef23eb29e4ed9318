"""fastdp_jax: differentially private SGD for tabular data in JAX/Flax.

Train with ``python main.py --config=configs/seq.py`` (or
:func:`fastdp_jax.train.train_and_evaluate`); load the exported model with
:func:`load_model`.
"""

from fastdp_jax.export import load_model

__all__ = ["load_model"]
