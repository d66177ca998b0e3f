"""The fused attention's masks derived once per model forward
(:func:`aligner.models.layer_spec.sdpa_masks`), not once per layer.

For three families on the fused spec (Llama: full attention; Mistral: every layer windowed;
Gemma 2: windowed and global layers alternating, attention-logit soft-capping) and three
masks (packed rows: block-diagonal; left padding: query rows that see no key; right
padding without a mask: the causal kernel), the logits of a forward that serves the
derived masks from the first layer to the others are bit for bit (``torch.equal``) those
of a forward in which every layer derives them itself (the cache emptied before each
layer's core attention, as the code did before it was kept).

The cache cannot go stale: a mask written in place gives the logits of a fresh copy of
the written mask; a freed mask's entry is dropped with it; a mask made in inference mode
(as the rollout engine makes them: no version counter) is not kept, and gives the same
logits.
"""
import gc

import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

VOCAB, SEQ, ROWS = 96, 16, 2


def _model_cfg(arch):
    from aligner.models import ModelConfig

    extra = {"llama": {}, "mistral": {"sliding_window": 6},
             "gemma2": {"sliding_window": 6, "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 16,
                        "layer_types": ["sliding_attention", "full_attention"] * 2}}[arch]
    return ModelConfig(arch=arch, vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96,
                       num_layers=4 if arch == "gemma2" else 2, num_attention_heads=4, num_query_groups=2,
                       max_position_embeddings=64, make_vocab_size_divisible_by=32, pad_token_id=0,
                       layer_spec="fused", **extra)


def _batches():
    from aligner.models.gpt import (attention_mask_from_padding, packed_attention_mask, packed_position_ids,
                                    position_ids_from_padding)

    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, VOCAB, (ROWS, SEQ), generator=g)
    left = torch.ones(ROWS, SEQ, dtype=torch.long)
    left[0, :5] = 0  # left padding: these queries see no key at all
    segments = torch.tensor([[0] * 6 + [1] * 7 + [9] * 3, [0] * 3 + [1] * 3 + [2] * 10])
    return {"packed": (tokens, packed_position_ids(segments), packed_attention_mask(segments)),
            "left": (tokens * left, position_ids_from_padding(left), attention_mask_from_padding(left)),
            "causal": (tokens, None, None)}


def _masks_world():
    from aligner.models import build_model
    from aligner.models import layer_spec
    from aligner.models.layer_spec import SDPAttention

    initialize(ParallelConfig(seed=3))
    out = {}
    for arch in ("llama", "mistral", "gemma2"):
        torch.manual_seed(3)
        model = build_model(_model_cfg(arch)).eval()
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        assert all(isinstance(c, SDPAttention) for c in cores)
        windows = [c.window for c in cores]

        def per_layer(tokens, positions, mask):  # every layer derives its masks itself
            hooks = [c.register_forward_pre_hook(lambda *_: layer_spec._SDPA_MASKS.clear()) for c in cores]
            try:
                with torch.no_grad():
                    return model(tokens, positions, mask)
            finally:
                for h in hooks:
                    h.remove()

        for name, (tokens, positions, mask) in _batches().items():
            layer_spec._SDPA_MASKS.clear()
            with torch.no_grad():
                cached = model(tokens, positions, mask)
            served = {w: layer_spec._SDPA_MASKS[w][0]() is mask for w in set(windows)} if mask is not None else {}
            out[f"{arch}/{name}"] = {"cached": cached, "per_layer": per_layer(tokens, positions, mask),
                                     "served": served, "windows": windows}
        # written in place: recomputed, as a fresh copy of the written mask gives
        tokens, positions, mask = _batches()["packed"]
        with torch.no_grad():
            model(tokens, positions, mask)
            mask[1, 0, 10:, 6:8] = True  # the third sample's later queries no longer see its first keys
            written = model(tokens, positions, mask)
        held, copy = len(layer_spec._SDPA_MASKS), mask.clone()
        with torch.inference_mode():  # a mask made in inference mode (no version counter): not kept
            inference_mask = mask.clone()
            logits = {"cached": model(tokens, positions, inference_mask), "per_layer": per_layer(tokens, positions, mask)}
            out[f"{arch}/inference_kept"] = any(e[0]() is inference_mask for e in layer_spec._SDPA_MASKS.values())
        out[f"{arch}/inference"] = {k: v.clone() for k, v in logits.items()}  # normal tensors, to send back
        del mask
        gc.collect()
        out[f"{arch}/freed"] = (held, len(layer_spec._SDPA_MASKS))
        out[f"{arch}/written"] = {"cached": written, "per_layer": per_layer(tokens, positions, copy)}
    return out


def test_masks_derived_once_per_forward_give_the_same_logits():
    out = spawn_local(_masks_world, 1, timeout=300)[0]
    for arch in ("llama", "mistral", "gemma2"):
        for name in ("packed", "left", "causal", "written", "inference"):
            run = out[f"{arch}/{name}"]
            assert torch.equal(run["cached"], run["per_layer"]), (arch, name)
            assert run["cached"].abs().max() > 0.1
        for name in ("packed", "left"):  # the first layer's masks were served to the others
            assert all(out[f"{arch}/{name}"]["served"].values()), (arch, name)
        assert not out[f"{arch}/inference_kept"], arch
        assert out[f"{arch}/freed"] == (len(set(out[f"{arch}/packed"]["windows"])), 0), arch  # gone with the mask
    assert set(out["llama/packed"]["windows"]) == {None}
    assert set(out["mistral/packed"]["windows"]) == {6}
    assert set(out["gemma2/packed"]["windows"]) == {6, None}  # windowed and global layers alternate
    # the write changed the logits (the entry was not served stale)
    assert not torch.equal(out["llama/written"]["cached"], out["llama/packed"]["cached"])
