"""The names of a model directory and of its files.

Kept apart from the code that writes, checks and reads the directory so that each of those
(:mod:`~fastdp_jax.export.model_dir`, :mod:`~fastdp_jax.export.card`,
:mod:`~fastdp_jax.export.predictor`) can name the files without importing the others.
"""

MODEL_DIR = "model"  # the export's directory inside a workdir
PARAMS_FILE = "params.npz"
SPEC_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"
MANIFEST_FILE = "MANIFEST.sha256"
SIGNATURE_FILE = MANIFEST_FILE + ".hmac"
COVERED_FILES = (CARD_FILE, SPEC_FILE, PARAMS_FILE)  # what the manifest lists, sorted
ALL_FILES = (*COVERED_FILES, MANIFEST_FILE, SIGNATURE_FILE)
