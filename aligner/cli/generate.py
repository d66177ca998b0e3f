"""``aligner generate``: responses for a file of prompts, optionally scored by a reward model.

    aligner generate --model HF_DIR_OR_CHECKPOINT --prompts prompts.jsonl --output out.jsonl \\
        [--num-samples 4 --temperature 0.7 --top-p 0.9 --max-new-tokens 256] \\
        [--reward-model RM_HF_DIR] [--tp 2 --pp 1]

Run under ``torchrun --nproc-per-node N`` for N > 1 processes (N = tp * pp * dp; each
data-parallel replica generates its share of the prompts; rank 0 writes the file).

- ``--model``: a HF folder (``config.json`` + safetensors) or a training checkpoint
  (``aligner.models.checkpoint``: a checkpoint root, whose latest complete checkpoint is
  read, or one ``step_*`` directory; ``--model-config`` names the architecture unless the
  checkpoint records it; ``--tokenizer`` is needed for text).
- ``--prompts``: any prompt-bearing format of the data layer (``aligner.data``); without
  it, jsonl rows with ``prompt`` (text, encoded as is) or ``prompt_tokens`` (ids).
- ``--template``: ``raw`` (default) encodes each prompt as it is; ``extra_id`` / ``chat`` /
  ``auto`` read any prompt-bearing format of the data layer (prompt rows, conversations,
  HelpSteer2, pairs, RewardBench rows: their prompt) and render it as a generation prompt.
- ``--attributes helpfulness=4,verbosity=1``: SteerLM steering (docs/steerlm.md). Every
  prompt is rendered with the attribute turn after the assistant header
  (``<extra_id_1>Assistant\\n<extra_id_2>helpfulness:4,correctness:4,...\\n``),
  exactly as a labelled row is rendered in SteerLM training; attributes not named take
  SteerLM's inference defaults (4/4/4/2/2; ``--attribute-defaults`` sets others, ``''``
  renders only the named attributes, for a model conditioned on other ones). A prompt
  row's own ``label`` field (or a labelled conversation's) wins over ``--attributes``.
  Needs the extra_id template (``--template extra_id``, or ``auto`` with a tokenizer
  without a chat template).
- ``--max-prompt-length N`` (default: the context, ``--max-seq-len`` or the model's, less
  one token for the response) and ``--overlong``: a prompt longer than N tokens, as it
  is generated from (rendered, with its attribute turn), is refused naming ``file:line``
  and its length (``error``, the default), keeps its last N tokens (``truncate_left``:
  the end of the prompt, next to the response) or is left out (``drop``); what was cut
  or dropped is counted on one stderr line. The values and counts of ``data.overlong``
  (docs/data_formats.md, "Length"). Rows are numbered (``index``) over the prompts kept.
- ``--batch-size`` slots decode together; ``--no-continuous-batching`` decodes the prompts
  in batches of that many, each until its last row ends, instead of handing a finished
  row's slot to the next waiting prompt (the default; the outputs are the same either
  way: docs/rollout.md).
- ``--output``: jsonl of plain JSON values, one row per (prompt, sample) in prompt order:
  ``index``, ``sample``, ``seed``, ``prompt``, ``response``, ``prompt_tokens``,
  ``response_tokens``, ``logprobs`` (per response token, the policy's unmodified
  distribution), ``stop_reason``, ``meta`` (the input row's other fields) and, with
  ``--reward-model``, ``scores`` (head output name -> value) and ``reward`` (the scalar,
  read as ``aligner rm score`` reads it: the weights the RM's training recorded, or
  ``--reward-attribute`` / ``--attribute-weights``). The reward model reads a templated
  prompt's conversation and the response text in its own template (as ``aligner rm score``
  would render the pair; ``--reward-template`` overrides it); a raw prompt is scored as
  prompt tokens + response tokens.

Sample ``k`` of prompt ``i`` draws from ``seed_for(seed, i * num_samples + k)``, so a
file regenerates identically for the same seed in any layout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from aligner.files import write_jsonl
from aligner.runtime import is_rank0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aligner generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or training checkpoint directory")
    p.add_argument("--model-config", default=None,
                   help="architecture for a training checkpoint: preset name, preset YAML or HF folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--prompts", required=True, help="prompt file (jsonl, or any data-layer prompt format)")
    p.add_argument("--template", choices=("raw", "extra_id", "chat", "auto"), default="raw",
                   help="raw: encode each prompt as it is (or take prompt_tokens); else render it as a chat prompt")
    p.add_argument("--attributes", default=None,
                   help="SteerLM attributes to condition on, e.g. helpfulness=4,verbosity=1 (others: 4,4,4,2,2)")
    p.add_argument("--output", required=True, help="responses jsonl to write")
    p.add_argument("--reward-model", default=None, help="HF reward model folder to score the responses")
    p.add_argument("--attribute-defaults", default=None,
                   help="values of the attributes --attributes does not name (default: SteerLM's"
                        " helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2; '' = none)")
    p.add_argument("--reward-attribute", default=None, help="reward-model output used as the reward")
    p.add_argument("--attribute-weights", type=float, nargs="*", default=None,
                   help="one weight per reward-model output: reward = w · outputs")
    p.add_argument("--reward-template", choices=("auto", "extra_id", "chat"), default=None,
                   help="how the reward model reads templated prompts (default: as its training recorded)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop-token-ids", default=None,
                   help="comma-separated ids; default: the tokenizer's EOS; 'none' for no stop token")
    p.add_argument("--stop-strings", nargs="*", default=[], help="stop strings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="rows generated together (the engine's slots)")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="a finished row's slot takes the next waiting prompt (default); --no-continuous-batching:"
                        " batches of --batch-size rows, each until its last row ends (the same outputs)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="prompt tokens at most (default: the context length - 1)")
    p.add_argument("--overlong", choices=("error", "truncate_left", "drop"), default="error",
                   help="a longer prompt: error (refused, naming file:line; default), truncate_left (its last"
                        " --max-prompt-length tokens kept) or drop (skipped, counted)")
    p.add_argument("--reward-batch-size", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    return p


def _fail(message: str) -> int:
    print(f"aligner generate: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- inputs
OPTION_NAMES = ("--max-prompt-length", "--overlong")  # what an over-length refusal names
def _stop_ids(text: Optional[str]):
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--stop-token-ids {text!r}: expected comma-separated integers or 'none'") from None


def load_tokenizer(path: Optional[str]):
    """The data layer's tokenizer (:func:`aligner.data.load_tokenizer`), or None without a path."""
    if path is None:
        return None
    from aligner.data import load_tokenizer as data_load_tokenizer

    return data_load_tokenizer(path)


def read_prompts(path: str, tokenizer, template: str = "raw", attributes: Optional[str] = None,
                 attribute_defaults: Optional[str] = None, max_length: Optional[int] = None,
                 overlong: str = "error") -> list:
    """``[{"prompt_tokens", "prompt", "meta"}]`` from ``path`` (see the module docstring).

    ``template="raw"``: jsonl rows with ``prompt`` (encoded as it is) or ``prompt_tokens``;
    ``extra_id`` / ``chat`` / ``auto``: any prompt-bearing format of the data layer,
    rendered as a generation prompt with that template. ``attributes``: a SteerLM request
    (``helpfulness=4,verbosity=1``) rendered after the assistant header of every prompt
    without a ``label`` of its own, the others at ``attribute_defaults`` (default SteerLM's;
    :func:`aligner.data.formats.steerlm_label`).

    ``max_length``: prompt tokens at most (None: no bound). A longer prompt, as it will be
    generated from (rendered, with its attribute turn), follows ``overlong`` as a prompt
    file's rows do in training (:func:`aligner.data.datasets.fit_prompt`): ``error``
    refuses it naming ``file:line`` and the lengths, ``truncate_left`` keeps its last
    ``max_length`` tokens, ``drop`` leaves it out; what was cut or dropped is reported on
    one line on stderr.
    """
    from collections import Counter

    from aligner.data.datasets import NO_BOUND, fit_prompt, print_report

    bound = NO_BOUND if max_length is None else max_length
    counts: Counter = Counter()
    label = None
    if attributes is not None:
        from aligner.data.formats import steerlm_label

        label = steerlm_label(attributes, **({} if attribute_defaults is None else {"defaults": attribute_defaults}))
        if template == "raw":
            raise ValueError("--attributes needs a rendered prompt: pass --template extra_id (raw renders no"
                             " attribute turn)")
    if template != "raw":
        from aligner.data import load_dataset
        from aligner.data.datasets import render_extra_id, resolve_template

        if tokenizer is None:
            raise ValueError(f"--template {template} needs a tokenizer")
        if label is not None and resolve_template(tokenizer, template) != "extra_id":
            raise ValueError(f"--attributes needs the extra_id template; --template {template} renders"
                             f" {resolve_template(tokenizer, template)}, which has no attribute turn")
        # rendered whole, then fitted here as they are generated from (with the attribute turn)
        data = load_dataset(path, kind="prompts", tokenizer=tokenizer, template=template, max_length=NO_BOUND,
                            overlong="error")
        rows = []
        for n, s in enumerate(data):
            tokens = s["prompt_tokens"].tolist()
            row_label = s.get("label")
            if label is not None and not row_label:
                row_label = label
                tokens, _ = render_extra_id(tokenizer, s["conversation"], label=label)
            tokens = fit_prompt(tokens, bound, overlong, counts, data.where(n), OPTION_NAMES)
            if tokens is None:
                continue
            rows.append({"prompt_tokens": tokens, "prompt": s["prompt"], "meta": s["meta"],
                         "conversation": s["conversation"], "label": row_label})
        print_report(path, len(rows), counts, unit="prompts")
        if not rows:
            raise ValueError(f"{path}: no prompts ({dict(counts)})")
        return rows
    from aligner.data.datasets import iter_json_objects

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    rows = []
    for line_no, row in iter_json_objects(p):
        meta = {k: v for k, v in row.items() if k not in ("prompt", "prompt_tokens")}
        if "prompt_tokens" in row:
            ids = row["prompt_tokens"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{path}:{line_no}: field 'prompt_tokens' must be a list of integers")
            text = row.get("prompt") if isinstance(row.get("prompt"), str) else None
        elif isinstance(row.get("prompt"), str):
            if tokenizer is None:
                raise ValueError(f"{path}:{line_no}: text prompts need a tokenizer (--tokenizer)")
            ids, text = tokenizer.encode(row["prompt"]), row["prompt"]
        else:
            raise ValueError(
                f"{path}:{line_no}: expected a string field 'prompt' or a list field 'prompt_tokens';"
                f" found fields {sorted(row)}"
            )
        ids = fit_prompt(list(ids), bound, overlong, counts, f"{path}:{line_no}", OPTION_NAMES)
        if ids is not None:
            rows.append({"prompt_tokens": ids, "prompt": text, "meta": meta})
    print_report(path, len(rows), counts, unit="prompts")
    if not rows:
        raise ValueError(f"{path}: no prompts" + (f" ({dict(counts)})" if counts else ""))
    return rows


# ---------------------------------------------------------------------------- models
def _is_hf_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def _checkpoint_dir(args) -> Path:
    """The checkpoint directory ``--model`` names (a checkpoint root: its latest complete one)."""
    from aligner.models import find_latest

    ckpt = Path(args.model)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--model {args.model}: neither a HF folder (config.json) nor a checkpoint directory")
    return find_latest(ckpt) if (ckpt / "latest").is_file() else ckpt


def policy_config(args):
    """The ModelConfig of ``--model`` (no weights read): a HF folder's, ``--model-config``, or
    the checkpoint's ``model_config.json``."""
    from aligner.models import ModelConfig

    if _is_hf_dir(args.model):
        return ModelConfig.from_hf(args.model)
    ckpt = _checkpoint_dir(args)
    if args.model_config is not None:
        return ModelConfig.load(args.model_config)
    if (ckpt / "model_config.json").is_file():
        source = ckpt / "model_config.json"
        return ModelConfig.from_dict(json.loads(source.read_text()), source=str(source))
    raise ValueError(
        f"--model {args.model}: the checkpoint records no model_config.json; pass --model-config"
        " (preset name, preset YAML or HF folder)"
    )


def load_policy(args, params_dtype):
    """(model chunks, ModelConfig) of ``--model`` for the current layout."""
    if _is_hf_dir(args.model):
        from aligner.models import from_pretrained

        return from_pretrained(args.model, params_dtype=params_dtype)
    from aligner.models import build_model, load_checkpoint

    cfg = policy_config(args)
    models = [build_model(cfg, params_dtype=params_dtype)]
    load_checkpoint(_checkpoint_dir(args), models)
    return models, cfg


def prompt_limit(args, model_cfg) -> int:
    """Prompt tokens at most: ``--max-prompt-length``, by default the context (``--max-seq-len``
    or the model's) less the one token a response needs."""
    context = args.max_seq_len or model_cfg.max_position_embeddings
    if args.max_prompt_length is None:
        return context - 1
    if args.max_prompt_length > context - 1:
        raise ValueError(f"--max-prompt-length {args.max_prompt_length}: expected at most {context - 1} (the"
                         f" context, {context} tokens, less one for the response)")
    return args.max_prompt_length


def score(args, readout, rows, prompts, tokenizer, pad_id) -> None:
    """Add ``scores`` and ``reward`` of the reward model to every row (every rank gets them).

    A prompt read through a template is scored as the reward model reads a (prompt,
    response) row (:func:`aligner.data.datasets.render_reward` with ``readout.template``, its
    own tokenizer where its folder has one); a raw prompt as prompt + response tokens.
    """
    import torch

    from aligner.training.scoring import score_sequences
    from aligner.rewards.readout import load_reward_model
    from aligner.data.datasets import render_reward

    rm_dir = Path(args.reward_model)
    has_tokenizer = any((rm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    rm_tokenizer = load_tokenizer(str(rm_dir)) if has_tokenizer else tokenizer
    sequences = []
    for r in rows:
        conv = prompts[r["index"]].get("conversation")
        if conv is not None and r["response"] is not None:
            sequences.append(render_reward(rm_tokenizer, readout.template, conv, r["response"])[0])
        else:
            sequences.append(r["prompt_tokens"] + r["response_tokens"])
    models, cfg, _ = load_reward_model(args.reward_model, args.tp, args.pp)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else pad_id
    outputs = score_sequences(models, [torch.tensor(s, dtype=torch.int64) for s in sequences], pad_id,
                              args.reward_batch_size)
    for r, values, reward in zip(rows, outputs.tolist(), readout.rewards(outputs).tolist()):
        r["scores"] = dict(zip(readout.names, values))
        r["reward"] = reward


# ---------------------------------------------------------------------------- main
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        return _fail(f"--num-samples = {args.num_samples}: expected a positive integer")
    from aligner.cli.options import at_least

    at_least("--batch-size", args.batch_size, 1)
    at_least("--reward-batch-size", args.reward_batch_size, 1)
    at_least("--max-seq-len", args.max_seq_len, 2)
    at_least("--max-prompt-length", args.max_prompt_length, 1)
    if not _is_hf_dir(args.model) and not Path(args.model).is_dir():
        return _fail(f"--model {args.model}: neither a HF folder (config.json) nor a checkpoint directory")
    readout = None
    if args.reward_model:
        if not _is_hf_dir(args.reward_model):
            return _fail(f"--reward-model {args.reward_model}: not a HF folder (no config.json)")
        from aligner.rewards.readout import ScoringError, require_reward_head, reward_readout
        from aligner.models.hf import head_outputs

        try:  # a folder without a reward head, names and weights that do not fit it: before any generation
            require_reward_head(args.reward_model, f"--reward-model {args.reward_model}")
            readout = reward_readout(args.reward_model, head_outputs(args.reward_model),
                                     reward_attribute=args.reward_attribute,
                                     attribute_weights=args.attribute_weights, template=args.reward_template)
        except (ScoringError, ValueError) as exc:  # also a folder without readable weights
            return _fail(str(exc))
    elif args.reward_attribute is not None or args.attribute_weights is not None or args.reward_template:
        return _fail("--reward-attribute / --attribute-weights / --reward-template need --reward-model")
    try:
        stop_ids = _stop_ids(args.stop_token_ids)
        from aligner.rollout import GenerationConfig, seed_for

        gen_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, greedy=args.greedy, stop_token_ids=stop_ids,
            stop_strings=args.stop_strings, seed=args.seed,
        )
    except ValueError as exc:
        return _fail(str(exc))

    import torch
    from megatron.core import parallel_state as ps

    from aligner.parallel import ParallelConfig, initialize
    from aligner.rollout import RolloutEngine

    tokenizer_dir = args.tokenizer or (args.model if _is_hf_dir(args.model) else None)
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        model_cfg = policy_config(args)
        prompts = read_prompts(args.prompts, tokenizer, args.template, args.attributes, args.attribute_defaults,
                               max_length=prompt_limit(args, model_cfg), overlong=args.overlong)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))

    dims = {}
    if _is_hf_dir(args.model):
        dims = dict(num_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
                    num_query_groups=model_cfg.num_query_groups)
    initialize(ParallelConfig(tp=args.tp, pp=args.pp), **dims)
    params_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        models, cfg = load_policy(args, params_dtype)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    engine = RolloutEngine(models, cfg, tokenizer=tokenizer, max_batch=args.batch_size,
                           max_seq_len=args.max_seq_len, continuous_batching=args.continuous_batching)

    # every (prompt, sample) row, with its seed; data-parallel replicas take contiguous shares
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.num_samples)]
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = (len(jobs) + dp_size - 1) // dp_size
    mine = jobs[dp_rank * share:(dp_rank + 1) * share]
    try:
        result = engine.generate([prompts[i]["prompt_tokens"] for i, _ in mine], gen_config,
                                 seeds=[seed_for(args.seed, i * args.num_samples + k) for i, k in mine])
    except ValueError as exc:
        return _fail(f"{args.prompts}: {exc}")
    rows = []
    for j, (i, k) in enumerate(mine):
        rows.append({
            "index": i, "sample": k, "seed": seed_for(args.seed, i * args.num_samples + k),
            "prompt": prompts[i].get("prompt"),
            "response": result.texts[j] if result.texts is not None else None,
            "prompt_tokens": list(prompts[i]["prompt_tokens"]),
            "response_tokens": result.response_tokens(j),
            "logprobs": result.response_logprobs(j).tolist(),
            "stop_reason": result.stop_reasons[j],
            "meta": prompts[i].get("meta") or {},
            **({"label": prompts[i]["label"]} if prompts[i].get("label") else {}),
        })
    if dp_size > 1:
        gathered = [None] * dp_size
        torch.distributed.all_gather_object(gathered, rows, group=ps.get_data_parallel_group())
        rows = [r for part in gathered for r in part]

    if args.reward_model:
        del engine, models
        score(args, readout, rows, prompts, tokenizer, result.pad_id)

    if is_rank0():
        out = write_jsonl(args.output, rows)
        print(f"aligner generate: wrote {len(rows)} responses for {len(prompts)} prompts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
