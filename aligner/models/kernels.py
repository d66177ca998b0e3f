"""The kernel sets a model's layers are built from (``model.layer_spec``), named apart from
:mod:`aligner.models.layer_spec`, which builds them, so that the config layer checks the
choice without importing torch or megatron-core (and neither module imports the other's
importers)."""

LAYER_SPECS = ("auto", "te", "fused", "local")
