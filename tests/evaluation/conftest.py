import pytest


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """Tests that build models in the pytest process (world size 1) leave no process group behind."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from aligner.parallel import destroy

        destroy()
