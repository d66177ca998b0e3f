"""Process groups, device and seeds shared by every algorithm (on megatron-core parallel_state)."""
from aligner.parallel.state import (
    DistEnv,
    LayoutError,
    ParallelConfig,
    destroy,
    get_device,
    initialize,
    is_initialized,
    padded_length,
    ranks,
    read_dist_env,
    set_seed,
    validate_layout,
)

__all__ = [
    "DistEnv", "LayoutError", "ParallelConfig", "destroy", "get_device", "initialize",
    "is_initialized", "padded_length", "ranks", "read_dist_env", "set_seed", "validate_layout",
]
