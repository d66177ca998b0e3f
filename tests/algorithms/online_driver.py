"""A complete online run on the tiny test assets, as a program one can kill and run again.

``python -m tests.algorithms.online_driver ALGORITHM ASSETS_JSON OUT_DIR STEPS SAVE_INTERVAL [SLEEP]``

- ``ppo``: PPO (2 epochs, mini-batches of 4) on tests.algorithms.ppo_setup's assets;
  ``ppo:lora``: the same with LoRA adapters (rank 4) and the critic a second adapter set on
  the policy's base (``ppo.critic_lora``);
- ``pg``: RLOO (reinforce loss, KL 0.05 as a k3 loss term: one update per rollout, the old
  log-probs from the update's forward) on the same assets; ``pg:LOSS``: GRPO with that
  ratio-based ``pg.loss`` (``gspo``, ``cispo``, ``clipped``), 2 epochs x mini-batches of 4;
- ``grpo_moe``: GRPO (2 epochs x mini-batches of 4) on the tiny Qwen3-MoE policy, with the
  load-balancing loss, the router z-loss and routing replay on;
- ``steerlm2``: SteerLM 2.0 sampling, 2 iterations x 2 epochs (STEPS is ignored: the run
  length follows from them) on tests.algorithms.steerlm2_setup's assets.
- ``spin``: SPIN, 2 iterations of 2 steps (STEPS is ignored); ``spin:window``: SPIN with
  ``spin.keep_previous`` 1 at global batch 4, iterations of 1 and 2 steps; and ``gkd``: on-policy
  distillation (generalised JSD, lmbda 0.5) whose other steps train on the teacher's own
  responses (``distill.responses`` teacher, generated before the first step), on ASSETS_JSON ``{"student", "teacher", "train"}``
  (the tiny HF models of tests/algorithms/conftest.py and prompt/completion rows).

Checkpoints every SAVE_INTERVAL steps and resume from the latest (the same command again),
then ``OUT_DIR/result.json``. SLEEP seconds per step make a kill during training easy to time.
"""
import json
import sys
import time


def _trainer(algorithm, assets, out_dir, steps, save_interval):
    trainer = {"max_steps": steps, "save_interval": save_interval, "resume": True, "export_hf": True}
    if algorithm in ("ppo", "ppo:lora"):
        from aligner.algorithms.ppo import PPOAlgorithm, PPOTrainer
        from tests.algorithms.ppo_setup import ppo_config

        ppo = {"epochs": 2, "mini_batch_size": 4}
        lora = {}
        if algorithm == "ppo:lora":
            ppo["critic_lora"] = True
            lora = {"enabled": True, "rank": 4, "alpha": 8.0}
        cfg = ppo_config(assets, out_dir, trainer=trainer, ppo=ppo, lora=lora)
        return PPOTrainer(cfg), PPOAlgorithm
    if algorithm == "grpo_moe":
        from aligner.algorithms.pg import PGAlgorithm, PGTrainer
        from tests.algorithms.pg_setup import pg_config

        trainer.update(log_rollouts=2, log_rollouts_rows=16, tensorboard=True)
        cfg = pg_config(assets, out_dir, trainer=trainer, init={"hf": assets["policy_moe"]},
                        pg={"advantage": "grpo", "loss": "clipped", "kl_coef": 0.05, "epochs": 2, "mini_batch_size": 4},
                        moe={"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001, "routing_replay": True})
        return PGTrainer(cfg), PGAlgorithm
    if algorithm == "pg" or algorithm.startswith("pg:"):
        from aligner.algorithms.pg import PGAlgorithm, PGTrainer
        from tests.algorithms.pg_setup import pg_config

        # every second step's 16 rollouts to the rollout log and TensorBoard (read back after a kill and resume)
        trainer.update(log_rollouts=2, log_rollouts_rows=16, tensorboard=True)
        # RLOO makes one update per rollout with KL as a loss term: the old log-probs come from
        # the update's own forward (no pass before it); the ratio losses keep the pass
        pg = {"advantage": "rloo", "loss": "reinforce", "kl_coef": 0.05, "kl_mode": "loss", "kl_estimator": "k3"}
        if algorithm.startswith("pg:"):
            pg = {"advantage": "grpo", "loss": algorithm[3:], "kl_coef": 0.05, "epochs": 2, "mini_batch_size": 4}
        cfg = pg_config(assets, out_dir, trainer=trainer, pg=pg)
        return PGTrainer(cfg), PGAlgorithm
    if algorithm == "steerlm2":
        from aligner.algorithms.steerlm import SteerLM2Algorithm, SteerLM2Trainer
        from tests.algorithms.steerlm2_setup import steerlm2_config

        cfg = steerlm2_config(assets, out_dir, trainer={"save_interval": save_interval, "resume": True})
        return SteerLM2Trainer(cfg), SteerLM2Algorithm
    if algorithm == "spin":
        from aligner.algorithms.spin import SPINAlgorithm, SPINTrainer
        from tests.algorithms.test_spin import spin_config

        cfg = spin_config(assets["student"], assets["train"], out_dir, global_batch_size=2, micro_batch_size=1,
                          save_interval=save_interval, resume=True)
        return SPINTrainer(cfg), SPINAlgorithm
    if algorithm == "spin:window":
        from aligner.algorithms.spin import SPINAlgorithm, SPINTrainer
        from tests.algorithms.test_spin_window import window_config

        cfg = window_config(assets["student"], assets["train"], out_dir, save_interval=save_interval, resume=True)
        return SPINTrainer(cfg), SPINAlgorithm
    if algorithm == "gkd":
        from aligner.algorithms.distill import DistillAlgorithm, DistillTrainer
        from tests.algorithms.test_distill import distill_config

        cfg = distill_config(assets["student"], assets["teacher"], assets["train"], out_dir, divergence="jsd",
                             lmbda=0.5, generation={"max_new_tokens": 6}, responses="teacher",
                             teacher_generation={"max_new_tokens": 6})
        cfg["trainer"].update(max_steps=steps, global_batch_size=2, micro_batch_size=1, save_interval=save_interval,
                              resume=True)
        return DistillTrainer(cfg), DistillAlgorithm
    raise SystemExit(f"ALGORITHM {algorithm!r}: expected ppo, ppo:lora, pg, pg:LOSS, grpo_moe, steerlm2, spin,"
                     " spin:window or gkd")


def main(algorithm, assets_json, out_dir, steps, save_interval, sleep=0.0):
    import torch

    torch.set_num_threads(1)
    assets = json.loads(open(assets_json).read())
    trainer, algorithm_cls = _trainer(algorithm, assets, out_dir, steps, save_interval)
    if sleep:
        step = algorithm_cls.train_step

        def slow(self, context):
            time.sleep(sleep)
            return step(self, context)

        algorithm_cls.train_step = slow
    result = trainer.fit()
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
         float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
