"""``aligner rollouts show RUN --step N``: the rollouts an online run logged at a step.

RUN is a run folder (``trainer.out_dir``) of a run with ``trainer.log_rollouts`` set; the
step's rows (aligner/training/rollout_log.py) are printed as a table, or one JSON object
a line with ``--json``. Without ``--step``, the last logged step.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from aligner.training.rollout_log import logged_steps, read_rollouts, rollout_table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner rollouts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the rollouts logged at a step")
    show.add_argument("run", help="the run folder (trainer.out_dir)")
    show.add_argument("--step", type=int, default=None, help="the step (default: the last logged)")
    show.add_argument("--full", action="store_true", help="whole prompts and responses (default: cut to 60 characters)")
    show.add_argument("--json", action="store_true", help="one JSON object a line")
    args = parser.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"aligner rollouts: error: {msg}", file=sys.stderr)
        return 2

    step = args.step
    if step is None:
        steps = logged_steps(args.run)
        if not steps:
            return fail(f"{args.run}: no rollouts logged (a run logs them with trainer.log_rollouts=N)")
        step = steps[-1]
    try:
        rows = read_rollouts(args.run, step)
    except FileNotFoundError as exc:
        return fail(str(exc))
    if args.json:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        print(f"step {step}: {len(rows)} rollouts")
        print(rollout_table(rows, width=None if args.full else 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
