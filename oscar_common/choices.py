"""The named choices server and clients agree on, in a module with no Flower import.

The wire module, the config and the model loaders all use these; keeping them apart lets the
benchmark and the server stages run where Flower is not installed (e.g. a GPU box for ``oscar-bench``).
"""

SCHEMES = ("pooled", "tokens")  # the two conditioning schemes (docs/official-code.md)
SCHEDULERS = ("official", "pndm", "ddim", "default")  # official: the official code's calls (oscar_common.models.official_scheduler)
TRANSPORT_DTYPES = ("float32", "float16")  # how upload means travel
SWITCHES = ("auto", "true", "false")  # tri-state run-config keys such as compile (auto: on CUDA only)
TRAIN_RECIPES = ("official", "official-openimage", "augmented")  # how the server trains its classifier (oscar_common.training.recipes)
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")  # training precision (oscar_common.training.loop.resolve_precision)
