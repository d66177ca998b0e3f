"""megatron-core's router in aligner: the auxiliary losses and the load statistics against
values computed here by hand from the router's own inputs, and routing replay: a rollout
whose routing is forced away from the training pass's (selection noise in the rollout
only) shows a log-prob mismatch without replay and none with it.

One spawned world-1 job computes everything (:func:`_job`); the checks run here."""
import pytest
import torch

from aligner.parallel.spawn import spawn_local

AUX, Z = 0.1, 0.01
E, K = 4, 2


def _config(arch="qwen3_moe"):
    from aligner.models import ModelConfig

    extra = {"moe_shared_expert_size": 24} if arch == "qwen2_moe" else {}
    return ModelConfig(arch=arch, vocab_size=64, hidden_size=32, ffn_hidden_size=16, num_layers=2,
                       num_attention_heads=4, num_query_groups=2, head_dim=8, max_position_embeddings=64,
                       num_experts=E, moe_router_topk=K, moe_norm_topk_prob=arch == "qwen3_moe", init_std=0.2,
                       **extra)


def _aux_case():
    """A training forward and backward of a 2-layer MoE model with the load-balancing loss
    and the z-loss on, and again with both off: the routers' inputs and weights, the step
    metrics, and the routers' weight gradients of both passes."""
    from aligner.models import build_model
    from aligner.models.moe import RouterStats, router_options, routers
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # the losses' gradient taken as it is (the schedule's scale)
    out = {}
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(5))
    first = None
    for name, options in (("on", router_options(aux_loss_coeff=AUX, z_loss_coeff=Z)), ("off", {})):
        model = build_model(_config(), **options)
        if first is None:
            first = model.state_dict()
        model.load_state_dict(first)  # the same weights in both passes
        stats = RouterStats([model])
        inputs = []
        for r in routers(model):
            with torch.no_grad():  # a fixed routing: weights far apart, so no near ties
                r.weight.copy_(3.0 * torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(r.layer_number)))
            r.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
        model.train()
        stats.reset()
        logits = model(tokens, None, None)
        logits.float().pow(2).mean().backward()
        out[name] = {"inputs": inputs, "weights": [r.weight.detach().clone() for r in routers(model)],
                     "grads": [r.weight.grad.detach().clone() for r in routers(model)], "metrics": stats.collect()}
    return out


def _replay_case():
    """Greedy rollouts of a random MoE policy: plainly (both decode paths), and with the
    routers' choice made on noisy logits (the rollout only, as GPU kernels or a capacity
    limit may choose differently at near ties), recorded; then the training pass's
    log-probs of the same tokens without and with replay of the recorded routing."""
    from aligner.models import build_model
    from aligner.models.moe import router_options, routers
    from aligner.rollout import GenerationConfig, RolloutEngine
    from aligner.training.forward import collect_token_outputs, policy_logps
    from aligner.training.roles import run_schedule
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    torch.manual_seed(11)
    cfg = _config("qwen2_moe")  # softmax before the top k: the probabilities too come from the logits
    model = build_model(cfg, **router_options(routing_replay=True))
    prompts = [torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 7)]
    greedy = GenerationConfig(max_new_tokens=12, greedy=True, stop_token_ids=[])

    def noisy_choice(router, args):
        if torch.is_inference_mode_enabled():  # the rollout's passes only
            logits = router.gating(args[0]).view(-1, E)
            noise = torch.randn(logits.shape, generator=gen)
            router.router_replay.set_target_indices(torch.topk(logits + noise, K, dim=1).indices)
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def passes(result, with_routing):
        n, width = result.tokens.shape
        rollout = torch.zeros(n, width)
        for i in range(n):
            p, r = int(result.prompt_lengths[i]), int(result.response_lengths[i])
            rollout[i, p:p + r] = result.logprobs[i, :r]
        routing = dict(routing=result.routing, routing_layers=torch.tensor(result.routing_layers)) if with_routing \
            else {}
        old = collect_token_outputs(run_schedule, [model], result.tokens, 2, policy_logps, lambda x: x, **routing)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for i in range(n):
            mask[i, int(result.prompt_lengths[i]):int(result.lengths[i])] = True
        diff = (old - rollout)[mask].double()
        # the online step's logprob_mismatch (mean |ratio - 1| over response tokens) and its max |Δ log p|
        return {"logprob_mismatch": float((diff.exp() - 1).abs().mean()), "max_abs": float(diff.abs().max())}

    out = {}
    for impl in ("fused", "megatron"):
        result = RolloutEngine([model], cfg, decode_impl=impl).generate(prompts, greedy, record_routing=True)
        out[f"plain_{impl}"] = passes(result, False)
        out[f"plain_{impl}_replayed"] = passes(result, True)
        out[f"recorded_{impl}"] = result.routing
        # 2 new tokens: the 5- and 7-token prompts end (at 7 and 9 tokens) before the prefill's
        # 9 columns do; the columns it routed past a row's last fed token are no token of it
        short = RolloutEngine([model], cfg, decode_impl=impl).generate(
            prompts, GenerationConfig(max_new_tokens=2, greedy=True, stop_token_ids=[]), record_routing=True)
        out[f"short_{impl}"] = (short.routing, short.lengths)
    gen = torch.Generator().manual_seed(0)
    handles = [r.register_forward_pre_hook(noisy_choice) for r in routers(model)]
    result = RolloutEngine([model], cfg).generate(prompts, greedy, record_routing=True)
    for h in handles:
        h.remove()
    for r in routers(model):
        r.router_replay.clear_router_replay_action()
    out["forced_without_replay"] = passes(result, False)
    out["forced_with_replay"] = passes(result, True)
    out["forced_routing"] = result.routing
    out["lengths"] = result.lengths
    return out


def _step_case():
    """Router gradients and embedding gradients of a one-layer Mixtral (4 experts, top 2)
    trained by SFT with the load-balancing loss: the SFT step's (megatron-core's schedule,
    every gradient divided by the step's target tokens) over one micro-batch and over two
    of unequal target counts; and transformers' gradients of its own loss (mean token
    cross-entropy + router_aux_loss_coef x its load-balancing loss) of each sequence
    alone, with and without the auxiliary term."""
    import tempfile

    import transformers as tf

    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models.hf import from_pretrained
    from aligner.models.moe import router_options, routers
    from aligner.training.config import OptimSection
    from aligner.training.roles import build_trainable_role, run_schedule

    torch.manual_seed(3)
    hf_cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              num_local_experts=E, num_experts_per_tok=K, initializer_range=0.2,
                              output_router_logits=True, router_aux_loss_coef=AUX / K, router_jitter_noise=0.0)
    hf = tf.MixtralForCausalLM(hf_cfg)
    with torch.no_grad():  # a fixed routing: router rows far apart, so no near ties
        hf.model.layers[0].mlp.gate.weight.mul_(15.0)
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 64, (16,), generator=g) for _ in range(2)]
    masks = [torch.zeros(16), torch.zeros(16)]
    masks[0][5:] = 1.0  # 11 target tokens
    masks[1][12:] = 1.0  # 4
    samples = [{"tokens": t, "loss_mask": m} for t, m in zip(seqs, masks)]

    def step(chosen, mbs):
        models, _ = from_pretrained(path, **router_options(aux_loss_coeff=AUX))
        role = build_trainable_role("policy", models, OptimSection(lr=0.0, warmup_steps=0), 1)
        for r in routers(role.chunks):
            r.calculate_per_token_loss = False
        algo = SFTAlgorithm(0)
        micro = algo.microbatches([samples[i] for i in chosen], mbs, 16)
        role.train()
        role.zero_grad()
        run_schedule(role.chunks, micro, algo.forward, algo.loss, forward_only=False, count=algo.loss_count)
        inner = role.chunks[0].module
        return {"router": routers(inner)[0].weight.main_grad.detach().clone(),
                "embedding": inner.embedding.word_embeddings.weight.main_grad[:64].detach().clone()}  # vocab padded

    def hf_grads(i, coef):
        model = tf.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, router_aux_loss_coef=coef)
        model.train()
        labels = torch.where(masks[i] > 0, seqs[i], torch.full_like(seqs[i], -100))
        out = model(input_ids=seqs[i][None], labels=labels[None])
        out.loss.backward()
        return {"router": model.model.layers[0].mlp.gate.weight.grad.detach().clone(),
                "embedding": model.model.embed_tokens.weight.grad.detach().clone(),
                "aux": float(out.aux_loss), "counts": int(masks[i].sum())}

    return {"one": step([0], 1), "two": step([0, 1], 1),
            "hf": [hf_grads(0, AUX / K), hf_grads(1, AUX / K)], "hf_without": hf_grads(0, 0.0)}


def _job():
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(tp=1, pp=1, seed=1))
    return {"aux": _aux_case(), "replay": _replay_case(), "step": _step_case()}


@pytest.fixture(scope="module")
def job():
    return spawn_local(_job, 1, timeout=300)[0]


def _by_hand(x, w):
    """The load-balancing loss (E Σ_i f_i P_i, f_i: share of the k·T routed slots expert i
    got, P_i: its mean softmax probability) and the z-loss (mean of logsumexp²) of one
    router, and the tokens per expert; x [s, b, h], w [E, h]."""
    logits = x.reshape(-1, x.shape[-1]).double() @ w.double().t()
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.zeros_like(probs).scatter(1, torch.topk(probs, K, dim=1).indices, 1.0)
    T = logits.shape[0]
    f = chosen.sum(0) / (T * K)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return aux, z, chosen.sum(0)


def test_aux_losses_and_expert_load_equal_their_hand_computed_values(job):
    on = job["aux"]["on"]
    auxes, zs, loads = zip(*[_by_hand(x, w) for x, w in zip(on["inputs"], on["weights"])])
    m = on["metrics"]
    assert abs(m["moe/load_balancing_loss"] - float(sum(auxes) / 2)) < 1e-6, (m, auxes)
    assert abs(m["moe/z_loss"] - float(sum(zs) / 2)) < 1e-5 * float(sum(zs)), (m, zs)
    loads = torch.stack(loads)  # [layers, E]: 30 tokens x 2 slots per layer
    assert loads.sum(1).tolist() == [60.0, 60.0]
    assert m["moe/tokens_per_expert_mean"] == 15.0
    assert m["moe/tokens_per_expert_max"] == float(loads.max()) and m["moe/tokens_per_expert_min"] == float(loads.min())
    assert abs(m["moe/load_max_over_mean"] - float((loads.max(1).values / 15.0).max())) < 1e-12
    assert loads.max() > loads.min()  # an unbalanced routing: the statistics compare something
    off = job["aux"]["off"]
    assert set(off["metrics"]) == {k for k in m if not k.endswith("loss")}  # no loss asked, none logged


def test_aux_losses_add_their_gradient_to_the_router(job):
    """The two passes differ only by the losses' gradient: AUX·∂aux/∂W + Z·∂z/∂W for the
    last layer's router W, with the token counts f_i constant (megatron-core's definition);
    an earlier router's weights also get the later layers' losses through its outputs."""
    on, off = job["aux"]["on"], job["aux"]["off"]
    for x, w, g_on, g_off in list(zip(on["inputs"], on["weights"], on["grads"], off["grads"]))[-1:]:
        w = w.double().requires_grad_(True)
        logits = x.reshape(-1, x.shape[-1]).double() @ w.t()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(probs).scatter(1, torch.topk(probs.detach(), K, dim=1).indices, 1.0)
        f = chosen.sum(0) / (logits.shape[0] * K)
        loss = AUX * E * (f * probs.mean(0)).sum() + Z * torch.logsumexp(logits, dim=-1).pow(2).mean()
        (want,) = torch.autograd.grad(loss, w)
        torch.testing.assert_close((g_on - g_off).double(), want, atol=1e-6, rtol=1e-4)
        assert want.abs().max() > 1e-3


def test_sft_step_weighs_the_load_balancing_loss_as_transformers_does(job):
    """One micro-batch: the step's gradient is transformers' gradient of its loss, mean token
    cross-entropy + c · aux (megatron-core's aux, E Σ f_i P_i with f_i a share of the k·T
    routed slots, is 1/k of transformers' one-layer aux: router_aux_loss_coef = c / k).
    Two micro-batches of 11 and 4 target tokens: the count-weighted mean of their
    objectives, (11 ∇L_1 + 4 ∇L_2) / 15, aux terms included."""
    s = job["step"]
    one, two, hf, without = s["one"], s["two"], s["hf"], s["hf_without"]
    for name in ("router", "embedding"):
        torch.testing.assert_close(one[name], hf[0][name], atol=1e-5, rtol=1e-5)
        n1, n2 = hf[0]["counts"], hf[1]["counts"]
        want = (n1 * hf[0][name] + n2 * hf[1][name]) / (n1 + n2)
        torch.testing.assert_close(two[name], want, atol=1e-5, rtol=1e-5)
    # the auxiliary term's share of the router's gradient is 100 x the tolerance: weighed by
    # 1 / (target tokens) instead of 1 (the step dividing it by its count), the check fails
    assert (hf[0]["router"] - without["router"]).abs().max() > 1e-3, (hf[0]["router"] - without["router"]).abs().max()
    assert hf[0]["aux"] > 1.0  # transformers' aux (k x megatron-core's) of an unbalanced routing


def test_rollout_and_training_route_alike_on_both_decode_paths(job):
    r = job["replay"]
    for impl in ("fused", "megatron"):
        for case in (f"plain_{impl}", f"plain_{impl}_replayed"):  # float32 rounding of log-probs of ~1-10
            assert r[case]["logprob_mismatch"] < 1e-6 and r[case]["max_abs"] < 4e-6, (case, r[case])
    # both decode paths route every fed token the same way
    assert torch.equal(r["recorded_fused"], r["recorded_megatron"])
    # rows that end inside the prefill's width: recorded up to their last fed token, no further
    for impl in ("fused", "megatron"):
        routing, lengths = r[f"short_{impl}"]
        assert lengths.tolist() == [7, 11, 9] and routing.shape[1] == 11
        for i, n in enumerate(lengths.tolist()):
            assert bool((routing[i, :n - 1] >= 0).all()) and bool((routing[i, n - 1:] == -1).all()), (impl, i)
    assert torch.equal(r["short_fused"][0], r["short_megatron"][0])


def test_routing_replay_removes_a_forced_routing_difference(job):
    r = job["replay"]
    routing, lengths = r["forced_routing"], r["lengths"]
    for i, n in enumerate(lengths.tolist()):
        assert bool((routing[i, :n - 1] >= 0).all())  # every token fed to the model was recorded
        assert bool((routing[i, n - 1:] == -1).all())  # the last one never is
    without, with_replay = r["forced_without_replay"], r["forced_with_replay"]
    assert without["logprob_mismatch"] > 1e-2 and without["max_abs"] > 0.1, without
    assert with_replay["logprob_mismatch"] < 1e-6 and with_replay["max_abs"] < 4e-6, with_replay


def test_moe_options_a_model_cannot_use_are_refused_before_any_work(tmp_path):
    """A dense model takes no moe option; routing replay needs an online trainer; a
    negative coefficient is refused: one line naming the key each time."""
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.sft import SFTTrainer
    from aligner.config import ConfigError
    from tests.models import families as fam

    for name in ("llama", "qwen3_moe"):
        fam.make_checkpoint(tmp_path, name)

    def trainer(cls, name, data, moe):
        path = tmp_path / name
        return cls({"init": {"hf": str(path)}, "data": {"train": str(path / data), "template": "raw"}, "moe": moe,
                    "trainer": {"out_dir": str(tmp_path / "run"), "global_batch_size": 2, "micro_batch_size": 1}})

    with pytest.raises(ConfigError, match=r"^moe.aux_loss_coeff = 0.01: model.arch = llama has no experts"
                                          r" \(model.num_experts is not set\)$"):
        trainer(SFTTrainer, "llama", "sft.jsonl", {"aux_loss_coeff": 0.01}).preflight()
    with pytest.raises(ConfigError, match=r"^moe.routing_replay = true: algorithm dpo does not train on rollouts'"):
        trainer(DPOTrainer, "qwen3_moe", "pairs.jsonl", {"routing_replay": True}).preflight()
    with pytest.raises(ConfigError, match=r"moe.z_loss_coeff"):
        trainer(SFTTrainer, "qwen3_moe", "sft.jsonl", {"z_loss_coeff": -1.0}).preflight()
    trainer(SFTTrainer, "qwen3_moe", "sft.jsonl", {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001}).preflight()
