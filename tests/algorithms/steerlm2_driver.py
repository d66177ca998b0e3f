"""A complete SteerLM 2.0 sampling run on the tiny assets of tests.algorithms.steerlm2_setup, as a program.

``python -m tests.algorithms.steerlm2_driver ASSETS_JSON OUT_DIR SAVE_INTERVAL [SLEEP]`` trains
2 iterations x 2 epochs (8 steps) with checkpoints every SAVE_INTERVAL steps and resume
from the latest (same command again), then writes ``OUT_DIR/result.json``. SLEEP seconds
per step make a kill during training easy to time.
"""
import json
import sys
import time


def main(assets_json, out_dir, save_interval, sleep=0.0):
    import torch

    from aligner.algorithms.steerlm import SteerLM2Algorithm, SteerLM2Trainer
    from tests.algorithms.steerlm2_setup import steerlm2_config

    torch.set_num_threads(1)
    assets = json.loads(open(assets_json).read())
    cfg = steerlm2_config(assets, out_dir, trainer={"save_interval": save_interval, "resume": True})
    if sleep:
        step = SteerLM2Algorithm.train_step

        def slow(self, context):
            time.sleep(sleep)
            return step(self, context)

        SteerLM2Algorithm.train_step = slow
    result = SteerLM2Trainer(cfg).fit()
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
