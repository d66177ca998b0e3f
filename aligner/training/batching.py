"""Micro-batch assembly for the training loop: padded rows or packed bins.

A micro-batch holds ``n`` sequences ("items", each a ``(tokens, loss_mask)`` pair of
1-D tensors) and is a dict:

- ``tokens`` [R, S] long, ``loss_mask`` [R, S] float (1 where the token is a target),
- ``item_of_token`` [R, S] long: which item each position belongs to (-1: padding),
- ``last_row`` / ``last_col`` [n]: where each item's last token sits,
- ``position_ids`` / ``attention_mask``: None for padded rows (positions 0..S-1 and
  causal attention, exact for right padding); for packed bins, positions restarting
  per item and a block-diagonal causal mask (megatron-core's boolean, True = blocked),
- ``num_items`` n and ``num_tokens`` (real tokens).

Padded: one item per row, right-padded to S. Packed: items are placed into bins of S
tokens by first-fit-decreasing over *groups* (a group — e.g. the chosen and rejected
response of one pair — always shares a bin, so they share a micro-batch); R bins per
micro-batch, a last short micro-batch filled with empty bins. Padding positions get their
own segment id in the mask so no row is fully blocked.

One shape per schedule call: pipeline stages exchange fixed-shape activations, so the
loop gives megatron-core micro-batches of one row count (:func:`fill_rows` appends
zero-weight rows to a short last micro-batch, e.g. a validation set that is not a
multiple of the micro-batch size) and, where the interleaved schedule needs it, whole
zero-weight micro-batches (:func:`filler_like`). Zero-weight rows belong to no item
(``item_of_token`` -1, ``loss_mask`` 0), so an algorithm that computes per item or per
target token never sees them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

Item = Tuple[torch.Tensor, torch.Tensor]


def padded_microbatch(items: Sequence[Item], seq_length: int, pad_id: int) -> dict:
    n = len(items)
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    item_of_token = torch.full((n, seq_length), -1, dtype=torch.long)
    last_col = torch.empty(n, dtype=torch.long)
    for i, (tok, mask) in enumerate(items):
        length = tok.numel()
        if length > seq_length:
            raise ValueError(f"sequence of {length} tokens does not fit seq_length {seq_length}")
        tokens[i, :length] = tok
        loss_mask[i, :length] = mask
        loss_mask[i, 0] = 0.0  # an item's first token has no prediction inside the item
        item_of_token[i, :length] = i
        last_col[i] = length - 1
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "item_of_token": item_of_token,
        "last_row": torch.arange(n),
        "last_col": last_col,
        "position_ids": None,
        "attention_mask": None,
        "num_items": n,
        "num_tokens": int(sum(t.numel() for t, _ in items)),
    }


def pack_groups(group_lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """First-fit-decreasing bins of group indices (the data layer's packer)."""
    # the packer loads its C++ extension (or reports the Python fallback) when packing is used
    from aligner.data.packing import pack_lengths

    return pack_lengths(list(group_lengths), capacity)


def packed_microbatches(
    groups: Sequence[Sequence[Item]], capacity: int, bins_per_micro: int, pad_id: int
) -> Tuple[List[dict], List[List[int]]]:
    """Pack ``groups`` into micro-batches of ``bins_per_micro`` bins of ``capacity`` tokens.

    Returns the micro-batches and, for each, the group indices it holds in item order
    (so the algorithm can attach per-group data, e.g. labels or reference log-probs).
    """
    # aligner.models is megatron-core: loaded when packed batches are built (batching is
    # imported by config checks, through the algorithms)
    from aligner.models.gpt import packed_attention_mask, packed_position_ids

    lengths = [sum(t.numel() for t, _ in g) for g in groups]
    for gi, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"a sample of {length} tokens does not fit a packing bin of {capacity} (data.max_length)")
    bins = pack_groups(lengths, capacity)
    out, members = [], []
    for start in range(0, len(bins), bins_per_micro):
        chunk = bins[start : start + bins_per_micro]
        rows = bins_per_micro
        tokens = torch.full((rows, capacity), pad_id, dtype=torch.long)
        loss_mask = torch.zeros(rows, capacity)
        item_of_token = torch.full((rows, capacity), -1, dtype=torch.long)
        segment = torch.full((rows, capacity), -1, dtype=torch.long)
        last_row, last_col, held = [], [], []
        item = 0
        for r, bin_groups in enumerate(chunk):
            col = 0
            for gi in bin_groups:
                held.append(gi)
                for tok, mask in groups[gi]:
                    length = tok.numel()
                    tokens[r, col : col + length] = tok
                    loss_mask[r, col : col + length] = mask
                    loss_mask[r, col] = 0.0  # predicted from the previous item: never a target
                    item_of_token[r, col : col + length] = item
                    segment[r, col : col + length] = item
                    last_row.append(r)
                    last_col.append(col + length - 1)
                    col += length
                    item += 1
        # every pad run gets a segment of its own: attends to itself, never to samples
        pad = segment < 0
        segment = torch.where(pad, 1_000_000 + torch.arange(rows)[:, None], segment)
        out.append(
            {
                "tokens": tokens,
                "loss_mask": loss_mask,
                "item_of_token": item_of_token,
                "last_row": torch.tensor(last_row, dtype=torch.long),
                "last_col": torch.tensor(last_col, dtype=torch.long),
                "position_ids": packed_position_ids(segment),
                "attention_mask": packed_attention_mask(segment),
                "num_items": item,
                "num_tokens": int((~pad).sum()),
            }
        )
        members.append(held)
    return out, members


def fill_rows(batch: dict, rows: int) -> dict:
    """``batch`` with zero-weight rows appended up to ``rows`` rows.

    A filler row repeats the last row's tokens (and its positions and mask, so attention
    stays well formed) with ``loss_mask`` 0 and ``item_of_token`` -1: it belongs to no
    item, so nothing computed per item or per target token (losses, counts, metrics)
    sees it. Pipeline stages exchange activations of one shape, so every micro-batch of
    a schedule call must have the same number of rows.
    """
    have = batch["tokens"].shape[0]
    if have > rows:
        raise ValueError(f"fill_rows: the micro-batch has {have} rows, more than {rows}")
    if have == rows:
        return batch
    extra = rows - have
    out = dict(batch)

    def repeat_last(t):
        return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    out["tokens"] = repeat_last(batch["tokens"])
    out["loss_mask"] = torch.cat([batch["loss_mask"], batch["loss_mask"].new_zeros(extra, *batch["loss_mask"].shape[1:])])
    out["item_of_token"] = torch.cat(
        [batch["item_of_token"], batch["item_of_token"].new_full((extra, *batch["item_of_token"].shape[1:]), -1)]
    )
    for key in ("position_ids", "attention_mask"):
        if batch.get(key) is not None:
            out[key] = repeat_last(batch[key])
    return out


def filler_like(like: dict) -> dict:
    """A micro-batch of ``like``'s keys and shapes that counts for nothing (``filler=True``):
    the schedule runs its forward and a backward of zeros, never the loss
    (:func:`aligner.training.roles.run_schedule`); a ``loss_mask`` is zeroed as well. Used
    where megatron-core's interleaved schedule needs a multiple of the pipeline size of
    micro-batches, and where experts split over the data-parallel ranks need as many
    micro-batches on every rank (:func:`aligner.training.roles.in_step_with_experts`)."""
    out = dict(like, filler=True)
    if torch.is_tensor(out.get("loss_mask")):
        out["loss_mask"] = torch.zeros_like(out["loss_mask"])
    return out


def schedule_microbatches(micro: List[dict], *, interleaved: bool, rows: Optional[int] = None) -> List[dict]:
    """The micro-batches of one schedule call in one shape: each filled with zero-weight rows
    up to ``rows`` (default: the largest row count, :func:`fill_rows`) and, under
    interleaved pipelining, zero-weight micro-batches appended up to a multiple of the
    pipeline size, as megatron-core's interleaved schedule requires (:func:`filler_like`)."""
    if not micro:
        return []
    rows = max(b["tokens"].shape[0] for b in micro) if rows is None else rows
    micro = [fill_rows(b, rows) for b in micro]
    if interleaved:
        from megatron.core import parallel_state as ps  # megatron-core loads when training runs, not with config checks

        micro += [filler_like(micro[-1]) for _ in range(-len(micro) % ps.get_pipeline_model_parallel_world_size())]
    return micro


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def per_item_sum(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum ``values`` [R, S] per item -> [n] (padding positions excluded)."""
    idx = batch["item_of_token"]
    keep = idx >= 0
    out = torch.zeros(batch["num_items"], dtype=values.dtype, device=values.device)
    return out.index_add(0, idx[keep], values[keep])


def shifted_logprobs(vocab_parallel_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) at position t ([R, S]; 0 at t = 0), vocab-parallel."""
    from aligner.models.logprobs import token_logprobs  # megatron-core: see packed_microbatches

    lp = token_logprobs(vocab_parallel_logits[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return torch.nn.functional.pad(lp, (1, 0))


# ------------------------------------------------------------------------------ packed rows
def packed_row_microbatches(lengths: Sequence[int], capacity: int, bins_per_micro: int,
                            tokens: torch.Tensor, fill: bool = True) -> List[dict]:
    """The rows of ``tokens`` [n, S] (row i's real tokens: its first ``lengths[i]``) packed
    by first-fit-decreasing into bins of ``capacity`` (>= S) tokens, ``bins_per_micro`` bins
    per micro-batch (a short last micro-batch filled with rows holding no sample; fill
    False: it keeps only its bins, for a schedule without pipeline stages).

    Each micro-batch: ``tokens`` / ``position_ids`` [bins_per_micro, capacity] (positions
    restarting per sample), ``attention_mask`` (block-diagonal causal, True = blocked),
    ``rows`` [k] (the indices into ``tokens`` of the k samples it holds, in order) and
    ``unpack_index`` [k, S]: the flat position (bin · capacity + column) of each sample's
    token p, -1 past its length — :func:`unpack_rows` maps an output on the packed rows
    back to one row per sample, as the padded micro-batch of ``rows`` would have it.
    """
    from aligner.models.gpt import packed_attention_mask, packed_position_ids  # megatron-core: see packed_microbatches

    n, S = tokens.shape
    for i, length in enumerate(lengths):
        if not 1 <= length <= min(S, capacity):
            raise ValueError(f"row {i} has {length} tokens; expected 1..{min(S, capacity)}")
    bins = pack_groups(list(lengths), capacity)
    out = []
    for start in range(0, len(bins), bins_per_micro):
        chunk = bins[start:start + bins_per_micro]
        width = bins_per_micro if fill else len(chunk)  # rows of this micro-batch
        packed = torch.zeros(width, capacity, dtype=torch.long)
        segment = torch.full((width, capacity), -1, dtype=torch.long)
        rows: List[int] = []
        index = torch.full((sum(len(b) for b in chunk), S), -1, dtype=torch.long)
        for r, members in enumerate(chunk):
            col = 0
            for i in members:
                length = int(lengths[i])
                packed[r, col:col + length] = tokens[i, :length]
                segment[r, col:col + length] = len(rows)
                index[len(rows), :length] = torch.arange(r * capacity + col, r * capacity + col + length)
                rows.append(i)
                col += length
        for r in range(len(chunk), width):  # rows holding no sample: a copy of bin 0, masked apart
            packed[r] = packed[0]
        pad = segment < 0
        segment = torch.where(pad, 1_000_000 + torch.arange(width)[:, None], segment)
        out.append({"tokens": packed, "position_ids": packed_position_ids(segment),
                    "attention_mask": packed_attention_mask(segment), "rows": torch.tensor(rows, dtype=torch.long),
                    "unpack_index": index})
    return out


def unpack_rows(values: torch.Tensor, batch: dict, shifted: bool = False) -> torch.Tensor:
    """``values`` [R, C, ...] computed on a packed micro-batch (:func:`packed_row_microbatches`)
    -> [k, S, ...], one row per sample as on padded rows (0 past a sample's length). shifted:
    the values at position p are about token p given the tokens before it (log-probs,
    entropies): a sample's position 0 is then 0, as on a padded row (its packed
    neighbour's prediction is not the sample's)."""
    index = batch["unpack_index"].to(values.device)
    valid = index >= 0
    if shifted:
        valid[:, 0] = False
    flat = values.reshape(-1, *values.shape[2:])
    picked = flat.index_select(0, index.clamp(min=0).reshape(-1)).reshape(*index.shape, *values.shape[2:])
    keep = valid.reshape(*valid.shape, *([1] * (values.dim() - 2)))
    return torch.where(keep, picked, torch.zeros_like(picked))
