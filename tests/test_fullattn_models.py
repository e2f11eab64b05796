"""LLaDA and Dream: logits = transformers' Llama / Qwen2 on the same weights under a full
bidirectional 4-D mask (Dream's oracle shifts), native names, faithful configs, the arch record."""

from __future__ import annotations

import json

import pytest
import torch

from dirl.model.families import family_for_config, get_family
from dirl.model.layout import readout_rows
from dirl.model.masks import TokenMeta
from dirl.model.forward import Readout
from tests.conftest import SHARED
from tests.fullattn_models import VOCAB, tiny_model

transformers = pytest.importorskip("transformers")


def _llama_names(name: str) -> str:
    """LLaDA's native weight name -> LlamaForCausalLM's."""
    table = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    parts = name.split(".")
    if parts[2] == "blocks":
        return ".".join(["model", "layers", parts[3], table[parts[4]], *parts[5:]])
    return {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}[parts[2]] + "." + parts[3]


def _hf_config(cls, **kwargs):
    theta = kwargs.pop("rope_theta")
    try:  # transformers >= 5 groups RoPE settings
        cfg = cls(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        cfg = cls(**kwargs, rope_theta=theta)
    cfg._attn_implementation = "eager"
    return cfg


def _oracle(model):
    cfg = model.config
    if cfg.arch.family == "llada":
        hf_cfg = _hf_config(transformers.LlamaConfig, vocab_size=VOCAB, hidden_size=cfg.d_model,
                            intermediate_size=cfg.mlp_hidden_size, num_hidden_layers=cfg.n_layers,
                            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                            attention_bias=False, mlp_bias=False)
        hf = transformers.LlamaForCausalLM(hf_cfg)
        state = {_llama_names(k): v for k, v in model.state_dict().items()}
    else:
        hf_cfg = _hf_config(transformers.Qwen2Config, vocab_size=VOCAB, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                            use_sliding_window=False)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
        state = model.state_dict()  # Dream's names are Qwen2's
    hf.load_state_dict(state, strict=True)
    return hf.float().eval()


def _oracle_token_logits(hf, ids, shift):
    """Logits the reference reads for each token: row i, or (Dream) row i - 1 with row 0 repeated."""
    full = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool)  # bidirectional
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    logits = hf(input_ids=ids, attention_mask=full, position_ids=pos).logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shift else logits


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_equal_transformers_oracle(family):
    model = tiny_model(family)
    hf = _oracle(model)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(13).expand(2, 13)
    shift = model.arch.logit_shift
    with torch.no_grad():
        theirs = _oracle_token_logits(hf, ids, shift)  # (2, 13, V)
        token_index = torch.arange(2 * 13).view(2, 13)[:, 1:].reshape(-1)  # every token but each row's first
        ours = model(ids, pos, None, readout=Readout(readout_rows(token_index, shift))).logits
    assert shift == (family == "dream")
    torch.testing.assert_close(ours, theirs[:, 1:].reshape(-1, VOCAB), atol=1e-5, rtol=0)
    if shift:  # the first generated token is read at the last prompt row
        with torch.no_grad():
            raw = model(ids, pos, None).logits
        torch.testing.assert_close(ours.view(2, 12, VOCAB)[:, 4], raw[:, 4], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padding_with_key_mask_equals_unpadded(family):
    """A left-padded row with a padding-key mask stays bidirectional: same logits as alone."""
    model = tiny_model(family)
    ids = torch.randint(2, VOCAB - 1, (1, 9), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.ones(1, 4, dtype=torch.long), ids], dim=1)  # (1, 13)
    valid = torch.arange(13)[None] >= 4
    pos = (torch.arange(13)[None] - 4).clamp_min(0)
    meta = TokenMeta(torch.where(valid, 0, -1), torch.zeros_like(pos), torch.ones_like(valid), torch.zeros_like(pos))
    with torch.no_grad():
        alone = model(ids, torch.arange(9)[None], None).logits
        with_pad = model(padded, pos, meta).logits[:, 4:]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=0)


def test_native_weight_names():
    llada, dream = tiny_model("llada"), tiny_model("dream")
    names = set(llada.state_dict())
    assert {"model.transformer.wte.weight", "model.transformer.ff_out.weight", "model.transformer.ln_f.weight",
            "model.transformer.blocks.1.ff_out.weight", "model.transformer.blocks.0.ff_proj.weight",
            "model.transformer.blocks.0.attn_out.weight"} <= names
    assert llada.lm_head is llada.model.transformer.ff_out
    assert "model.layers.0.self_attn.q_proj.bias" in dream.state_dict()
    assert "model.layers.0.self_attn.o_proj.bias" not in dream.state_dict()


REAL = {"llada": ("llada-8b-instruct", "llada-8b"), "dream": ("dream-v0-instruct-7b", "dream-7b")}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_real_config_arch_and_faithful_round_trip(family):
    folder, preset = REAL[family]
    path = SHARED / folder / "config.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = json.loads(path.read_text())
    fam = family_for_config(data)
    assert fam.name == family
    cfg = fam.config_cls.from_hf_dict(data)
    out = cfg.to_hf_dict()
    assert out == data and list(out) == list(data)  # faithful: same fields, values and order
    arch = cfg.arch
    expected = {"llada": dict(attention="bidirectional", logit_shift=0, num_layers=32, hidden_size=4096, num_heads=32,
                              num_kv_heads=32, head_dim=128, vocab_size=126464, mask_token_id=126336,
                              eos_token_id=126081, pad_token_id=126081, max_position_embeddings=4096),
                "dream": dict(attention="bidirectional", logit_shift=1, num_layers=28, hidden_size=3584, num_heads=28,
                              num_kv_heads=4, head_dim=128, vocab_size=152064, mask_token_id=151666,
                              eos_token_id=151643, pad_token_id=151643, max_position_embeddings=131072)}[family]
    assert {k: getattr(arch, k) for k in expected} == expected
    # The preset of the real shape is that config; the parameter count matches the index's tensors.
    assert fam.config_cls(**fam.presets[preset]).arch == arch
    index = json.loads((SHARED / folder / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    assert set(model.state_dict()) == set(index)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_changed_field_is_written_with_family_names():
    fam = get_family("llada")
    cfg = fam.config_cls.from_hf_dict({"model_type": "llada", "d_model": 64, "n_heads": 4, "n_layers": 2,
                                       "mlp_hidden_size": 128, "vocab_size": 48, "embedding_size": 48,
                                       "mask_token_id": 47, "block_type": "llama"})
    cfg.n_layers = 3
    out = cfg.to_hf_dict()
    assert out["n_layers"] == 3 and "num_hidden_layers" not in out and out["block_type"] == "llama"
    assert "n_kv_heads" not in out  # derived on load, not added on save
    with pytest.raises(ValueError, match="alibi"):
        fam.config_cls.from_hf_dict({"model_type": "llada", "alibi": True})


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_states_run_as_rows_equal_the_segment_mask(family, monkeypatch):
    """Rows packing several states (+ padding): each state run as its own row = the dense
    segment-bidirectional mask over the packed row, every position."""
    import dirl.model.decoder as decoder
    from dirl.model.layout.bidirectional import state_meta

    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    copy = torch.tensor([[0] * 5 + [1] * 5 + [-1] * 2, [0] * 4 + [1] * 4 + [2] * 4])
    doc = torch.where(copy >= 0, 0, -1)
    pos = torch.tensor([list(range(5)) * 2 + [0, 0], list(range(4)) * 3])
    meta = state_meta(doc, copy.clamp_min(0))
    assert decoder.segments(meta)[0].shape == (5, 5)
    with torch.no_grad():
        as_rows = model(ids, pos, meta).logits
        monkeypatch.setattr(decoder, "segments", lambda meta: None)
        masked = model(ids, pos, meta).logits
    real = doc >= 0
    torch.testing.assert_close(as_rows[real], masked[real], atol=1e-5, rtol=0)


def _two_rows():
    """Row 0: prompt [5, 9], response [12, 3, 1]; row 1: prompt [20], response [4, 7], two padding."""
    from dirl.algo.nelbo import TokenBatch

    return TokenBatch(torch.tensor([[5, 9, 12, 3, 1], [20, 4, 7, 1, 1]]), torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]),
                      torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, -1, -1]]),
                      torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool),
                      torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, -1, -1]]))


def test_autoregressive_loss_equals_transformers_causal_lm():
    """Dream's AR stage (``objective=autoregressive``) = Qwen2ForCausalLM's own causal forward on the
    same weights: per sample the mean CE of its response tokens (each read at the row before it),
    then the mean over samples; the padded row scores only its own tokens."""
    from dirl.algo.autoregressive import sft_autoregressive

    model = tiny_model("dream", seed=5)
    hf = _oracle(model)

    def mean_ce(seq, scored):
        logits = hf(input_ids=torch.tensor([seq])).logits[0]  # transformers' default: causal
        return sum(-float(torch.log_softmax(logits[i - 1], -1)[seq[i]]) for i in scored) / len(scored)

    with torch.no_grad():
        loss, stats = sft_autoregressive(model, _two_rows())
        expected = (mean_ce([5, 9, 12, 3, 1], (2, 3, 4)) + mean_ce([20, 4, 7], (1, 2))) / 2
    assert stats == {"num_scored": 5, "num_response": 5}
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="shifted-logit"):  # LLaDA reads token i at row i: no AR readout
        sft_autoregressive(tiny_model("llada", seed=5), _two_rows())
