"""A complete RLOO run (``aligner train pg``) on the tiny assets of tests.algorithms.ppo_setup,
as a program.

``python -m tests.algorithms.pg_driver ASSETS_JSON OUT_DIR STEPS SAVE_INTERVAL [SLEEP]`` trains
with checkpoints every SAVE_INTERVAL steps and resume from the latest (same command again),
then writes ``OUT_DIR/result.json``. SLEEP seconds per step make a kill during training
easy to time.
"""
import json
import sys
import time


def main(assets_json, out_dir, steps, save_interval, sleep=0.0):
    import torch

    from aligner.algorithms.pg import PGAlgorithm, PGTrainer
    from tests.algorithms.pg_setup import pg_config

    torch.set_num_threads(1)
    assets = json.loads(open(assets_json).read())
    cfg = pg_config(assets, out_dir, trainer={"max_steps": steps, "save_interval": save_interval, "resume": True,
                                              "export_hf": True},
                    pg={"advantage": "rloo", "loss": "reinforce", "kl_coef": 0.05})
    trainer = PGTrainer(cfg)
    if sleep:
        step = PGAlgorithm.train_step

        def slow(self, context):
            time.sleep(sleep)
            return step(self, context)

        PGAlgorithm.train_step = slow
    result = trainer.fit()
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
