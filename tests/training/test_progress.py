"""The progress line of a stage shows what its steps report: the loss of the offline
algorithms, and the policy loss and mean reward of the online ones (PPO, REINFORCE)."""
from tests.log_messages import kept_messages


def test_online_progress_shows_reward_and_loss():
    from aligner.training.logging import Progress

    with kept_messages() as lines:
        progress = Progress("stage", 4)  # stderr is not a terminal here: one logged line per update
        progress.update(1, {"loss/policy": -0.125, "reward/mean": 1.5, "kl_ref": 0.01})
        progress.update(2, {"loss": 0.5, "tokens_per_s": 1200.0})
    assert lines[0].startswith("stage:  25%") and lines[0].endswith("loss=-0.1250, reward=1.5000]")
    assert lines[1].startswith("stage:  50%") and lines[1].endswith("loss=0.5000, tok/s=1200]")
