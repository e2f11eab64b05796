"""The llada2 family: config read/write, native weight names, an independent per-token oracle,
and hand-computed routing on two experts (the engine at B = 32: test_llada2_engine.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED

from dirl.model.llada2.config import ARCHITECTURE as ARCH
from dirl.model.llada2.config import PRESETS, LLaDA2Config
from dirl.model.llada2.model import LLaDA2MoeModelLM
from dirl.model.llada2.moe import SparseMoeBlock, route
from dirl.model.masks import TokenMeta

MINI = SHARED / "llada2.0-mini"
B = 32


def tiny_llada2(tokenizer, seed: int = 0, bias_std: float = 0.0, **fields) -> LLaDA2MoeModelLM:
    cfg = LLaDA2Config.for_init(PRESETS["tiny"], vocab_size=tokenizer.vocab_size,
                                mask_token_id=tokenizer.mask_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)
    model = LLaDA2MoeModelLM(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.moe_blocks().values():  # a bias that changes some selections
            block.gate.expert_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * bias_std)
    return model.eval()


# -- config and weight names ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_config() -> dict:
    if not (MINI / "config.json").exists():
        pytest.skip(f"{MINI} not available")
    return json.loads((MINI / "config.json").read_text())


def test_real_config_reads_into_the_arch_record_and_writes_back_unchanged(mini_config):
    cfg = LLaDA2Config.from_hf_dict(mini_config)
    arch = cfg.arch
    assert (arch.family, arch.attention, arch.logit_shift, arch.block_size) == ("llada2", "block_causal", 0, 32)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (20, 2048, 16, 4, 128)
    assert (arch.vocab_size, arch.mask_token_id, arch.eos_token_id, arch.pad_token_id) == (157184, 156895, 156892, 156892)
    assert cfg.rotary_dims == mini_config["rotary_dim"] == 64 and cfg.torch_dtype == "bfloat16"
    assert cfg.to_hf_dict() == mini_config  # faithful: nothing added, nothing lost
    cfg.block_size, cfg.n_group = 64, 4
    out = cfg.to_hf_dict()
    assert (out["block_size"], out["n_group"]) == (64, 4) and out["dtype"] == "bfloat16"


def test_parameter_count_matches_the_real_weight_index(mini_config):
    """16.26B parameters (1.43B active); the index's byte total = 2 B x (parameters + the expert biases)."""
    cfg = LLaDA2Config.from_hf_dict(mini_config)
    index = json.loads((MINI / "model.safetensors.index.json").read_text())
    biases = (cfg.num_hidden_layers - cfg.first_k_dense_replace) * cfg.num_experts
    assert 2 * (cfg.num_parameters() + biases) == index["metadata"]["total_size"]
    assert round(cfg.num_active_parameters() / 1e9, 2) == 1.43


def test_module_tree_has_the_real_checkpoint_names(mini_config):
    """The mini shape's module tree (first 2 of 20 layers: the dense one and an MoE one, on the meta
    device) has exactly the real index's tensor names for those layers."""
    cfg = LLaDA2Config.from_hf_dict({**mini_config, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(cfg)
    index = json.loads((MINI / "model.safetensors.index.json").read_text())
    real = {k for k in index["weight_map"] if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    assert len(real) == 3 + 9 + 11 + 256 * 3  # root, the dense layer, an MoE layer with its experts
    assert set(model.state_dict()) == real
    assert model.state_dict()["model.layers.1.attention.query_key_value.weight"].shape == (3072, 2048)


# -- the oracle: a naive per-token implementation from the public description -------------------------------


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean() + eps))


def _rope(x, pos, dims, theta):
    """Rotate pairs (i, i + dims/2) of the first ``dims`` entries by pos * theta^(-2i/dims)."""
    out, half = x.clone(), dims // 2
    for i in range(half):
        angle = pos * theta ** (-2 * i / dims)
        a, b = x[i], x[i + half]
        out[i], out[i + half] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def _swiglu(sd, prefix, x):
    gate, up = sd[prefix + "gate_proj.weight"] @ x, sd[prefix + "up_proj.weight"] @ x
    return sd[prefix + "down_proj.weight"] @ (gate * torch.sigmoid(gate) * up)


def _moe(sd, prefix, cfg, x):
    scores = [float(torch.sigmoid(w @ x)) for w in sd[prefix + "gate.weight"]]
    biased = [s + float(b) for s, b in zip(scores, sd[prefix + "gate.expert_bias"])]
    size = cfg.num_experts // cfg.n_group
    group_score = [sum(sorted(biased[g * size:(g + 1) * size])[-2:]) for g in range(cfg.n_group)]
    groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
    candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: -biased[e])[:cfg.num_experts_per_tok]
    total = sum(scores[e] for e in chosen)
    out = sum(scores[e] / total * cfg.routed_scaling_factor * _swiglu(sd, f"{prefix}experts.{e}.", x) for e in chosen)
    return out + _swiglu(sd, prefix + "shared_experts.", x), chosen


def oracle_logits(model, ids: list[int], block: int) -> tuple[torch.Tensor, set]:
    """Logits (T, V) of one clean block-causal sequence, token by token in float64; and the
    (layer, token, expert) choices that ``expert_bias`` changed."""
    cfg, sd = model.config, {k: v.double() for k, v in model.state_dict().items()}
    heads, kv_heads, dim, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    rot = int(dim * cfg.partial_rotary_factor)
    xs = [sd["model.word_embeddings.weight"][t] for t in ids]
    biased_changes = set()
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        qs, ks, vs = [], [], []
        for t, x in enumerate(xs):
            qkv = sd[p + "attention.query_key_value.weight"] @ _rms(x, sd[p + "input_layernorm.weight"], eps)
            head = [qkv[i * dim:(i + 1) * dim] for i in range(heads + 2 * kv_heads)]
            qs.append([_rope(_rms(h, sd[p + "attention.query_layernorm.weight"], eps), t, rot, cfg.rope_theta)
                       for h in head[:heads]])
            ks.append([_rope(_rms(h, sd[p + "attention.key_layernorm.weight"], eps), t, rot, cfg.rope_theta)
                       for h in head[heads:heads + kv_heads]])
            vs.append(head[heads + kv_heads:])
        new = []
        for t, x in enumerate(xs):
            visible = [j for j in range(len(xs)) if j // block <= t // block]
            out = []
            for h in range(heads):
                g = h // (heads // kv_heads)
                logits = torch.stack([qs[t][h] @ ks[j][g] / math.sqrt(dim) for j in visible])
                out.append(sum(w * vs[j][g] for w, j in zip(torch.softmax(logits, 0), visible)))
            x = x + sd[p + "attention.dense.weight"] @ torch.cat(out)
            h_in = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            if layer < cfg.first_k_dense_replace:
                x = x + _swiglu(sd, p + "mlp.", h_in)
            else:
                mlp, chosen = _moe(sd, p + "mlp.", cfg, h_in)
                x = x + mlp
                plain = sorted(range(cfg.num_experts), key=lambda e: -float(sd[p + "mlp.gate.weight"][e] @ h_in))
                if set(chosen) != set(plain[:cfg.num_experts_per_tok]):
                    biased_changes.add((layer, t))
            new.append(x)
        xs = new
    final = [_rms(x, sd["model.norm.weight"], eps) for x in xs]
    return torch.stack([sd["lm_head.weight"] @ x for x in final]), biased_changes


def test_logits_equal_the_per_token_oracle(tokenizer):
    """Our batched forward = the naive float64 oracle on the same weights, <= 1e-5 (fp32), over 2.3
    blocks of 32 with a bias that changes some expert selections."""
    model = tiny_llada2(tokenizer, seed=3, bias_std=0.05)
    ids = torch.randint(4, 100, (75,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(75)[None]
    with torch.no_grad():
        ours = model(ids[None], pos, TokenMeta.clean(pos, B)).logits[0]
    expected, changed = oracle_logits(model, ids.tolist(), B)
    assert changed  # the bias really steered some choices
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)


def test_routing_by_hand_on_two_experts():
    """sigmoid scores [0.5, 0.75]; bias [0.3, 0] makes the biased scores [0.8, 0.75]."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    bias = torch.tensor([0.3, 0.0])
    ids, weights = route(logits, bias, top_k=1, n_group=1, topk_group=1, scale=2.5)
    assert ids.tolist() == [[0]]  # the bias picks expert 0, whose plain score is lower
    assert weights.tolist() == [[1.25]]  # top-1: its plain score 0.5, not normalised, x 2.5
    ids, weights = route(logits, bias, top_k=2, n_group=1, topk_group=1, scale=2.5)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.5]]))  # [0.5, 0.75] / 1.25 x 2.5


def test_moe_block_by_hand_on_two_experts():
    """x = [1, 0]; expert e's output is [silu(a_e), 0] with a = (1, 2): 1.0 silu(1) + 1.5 silu(2)."""
    cfg = LLaDA2Config(hidden_size=2, moe_intermediate_size=1, num_experts=2, num_experts_per_tok=2,
                       num_shared_experts=0, n_group=1, topk_group=1, routed_scaling_factor=2.5, vocab_size=8,
                       mask_token_id=7)
    block = SparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
        block.gate.expert_bias.copy_(torch.tensor([0.3, 0.0]))
        for e, a in enumerate((1.0, 2.0)):
            block.experts[e].gate_proj.weight.copy_(torch.tensor([[a, 0.0]]))
            block.experts[e].up_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
            block.experts[e].down_proj.weight.copy_(torch.tensor([[1.0], [0.0]]))
        out = block(torch.tensor([[[1.0, 0.0]]]))
    silu_1, silu_2 = 1 / (1 + math.exp(-1.0)), 2 / (1 + math.exp(-2.0))  # a sigmoid(a)
    assert out.shape == (1, 1, 2)
    assert out[0, 0].tolist() == pytest.approx([1.0 * silu_1 + 1.5 * silu_2, 0.0], abs=1e-6)
    assert block.expert_counts.tolist() == [1, 1]


def test_bf16_router_runs_in_fp32(tokenizer):
    model = tiny_llada2(tokenizer).to(torch.bfloat16)
    seen = []
    block = model.moe_blocks()[1]
    block.gate.register_forward_hook(lambda m, args, out: seen.append(out[1].dtype))
    pos = torch.arange(8)[None]
    with torch.no_grad():
        logits = model(torch.arange(4, 12)[None], pos, TokenMeta.clean(pos, B)).logits
    assert seen == [torch.float32] and logits.dtype == torch.bfloat16


# -- the registry, dirl init, save and load -------------------------------------------------------------------


def test_registry_picks_llada2_for_the_real_config(mini_config):
    from dirl.model.families import family_for_config

    family = family_for_config(mini_config)
    assert family.name == "llada2" and family.model_cls is LLaDA2MoeModelLM
    assert family_for_config({"architectures": ["LLaDA2MoeModelLM"]}).name == "llada2"


def test_init_save_load_round_trip(tmp_path):
    """``dirl init family=llada2``: a checkpoint in LLaDA2's own schema and names that loads back
    as the same function (expert biases included)."""
    from dirl.model.checkpoint import load_pretrained, save_pretrained
    from dirl.model.factory import InitConfig, init_checkpoint

    path = init_checkpoint(InitConfig(family="llada2", preset="tiny", seed=2), tmp_path / "ckpt")  # B: LLaDA2's 32
    saved = json.loads((path / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"], saved["block_size"]) == ("llada2_moe", [ARCH], 32)
    model, tokenizer = load_pretrained(path)
    assert isinstance(model, LLaDA2MoeModelLM) and model.arch.block_size == 32
    with torch.no_grad():
        model.moe_blocks()[1].gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    again, _ = load_pretrained(save_pretrained(model, tokenizer, tmp_path / "again"))
    pos = torch.arange(40)[None]
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (m(ids, pos, TokenMeta.clean(pos, B)).logits for m in (model, again))
    assert torch.equal(a, b)
    assert torch.equal(again.moe_blocks()[1].gate.expert_bias, torch.linspace(-0.1, 0.1, 8))
