"""SteerLM 2.0 (docs/steerlm.md; Wang et al., HelpSteer2, arXiv 2406.08673): the config
section and trainer (:mod:`.trainer`), the objective as an algorithm, on pre-scored groups
and with sampling inside the run (:mod:`.algorithm`), and the sampling (:mod:`.sampler`)."""
from aligner.algorithms.steerlm.algorithm import IterativeSteerLM2Algorithm, SteerLM2Algorithm
from aligner.algorithms.steerlm.sampler import SteerLM2Sampler
from aligner.algorithms.steerlm.trainer import SteerLM2Config, SteerLM2Section, SteerLM2Trainer, load_steerlm2

__all__ = ["IterativeSteerLM2Algorithm", "SteerLM2Algorithm", "SteerLM2Config", "SteerLM2Sampler",
           "SteerLM2Section", "SteerLM2Trainer", "load_steerlm2"]
