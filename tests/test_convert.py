"""``dirl convert``: a tiny Qwen3 made by transformers -> a block-diffusion checkpoint.

Oracle: with block_size 1 the converted model's logits equal transformers'
Qwen3ForCausalLM on the original directory (fp32); then SFT trains it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dirl.cli import main as cli_main
from dirl.model.checkpoint import load_pretrained
from dirl.model.masks import TokenMeta
from dirl.model.sdar.convert import mean_row_init
from dirl.model.tokenizer import CHAR_ALPHABET

transformers = pytest.importorskip("transformers")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_tokenizer():
    """A small Qwen-like tokenizer (characters + Qwen's special tokens) with no mask token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHAR_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS[0]))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                              additional_special_tokens=SPECIALS[1:])
    hf.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return hf


def _as_transformers4(directory):
    """Rewrite a config.json saved by transformers 5 the way transformers 4 spells it: ``rope_theta``
    and ``torch_dtype`` at the top level (no ``rope_parameters`` / ``dtype``)."""
    data = json.loads((directory / "config.json").read_text())
    rope = data.pop("rope_parameters")
    assert rope["rope_type"] == "default"
    data.update(rope_theta=rope["rope_theta"], torch_dtype=data.pop("dtype"), transformers_version="4.52.4")
    (directory / "config.json").write_text(json.dumps(data, indent=2))


@pytest.fixture(params=["transformers5", "transformers4"])
def qwen_dir(tmp_path, request):
    """A tiny random Qwen3ForCausalLM saved by transformers, embedding rows == tokenizer size, RoPE theta
    5000 (neither Qwen3's default nor SDAR's), its config.json in each transformers format."""
    hf_tokenizer = _qwen_tokenizer()
    cfg = transformers.Qwen3Config(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # random norm gains, so a misplaced norm cannot hide behind all-ones
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape))
    directory = tmp_path / "qwen3"
    model.save_pretrained(str(directory))
    hf_tokenizer.save_pretrained(str(directory))
    if request.param == "transformers4":
        _as_transformers4(directory)
    return directory


def test_mean_row_init_grows_and_sets_new_rows():
    weight = torch.tensor([[1.0, 2.0], [3.0, 6.0], [9.0, 9.0]])  # row 2: an untrained padding row
    grown = mean_row_init(weight, num_existing=2, num_rows=4, new_ids=[3])
    assert torch.equal(grown, torch.tensor([[1.0, 2.0], [3.0, 6.0], [9.0, 9.0], [2.0, 4.0]]))


def test_convert_keeps_the_ar_model_and_sft_trains_it(qwen_dir, tmp_path):
    out = tmp_path / "sdar"
    assert cli_main(["convert", str(qwen_dir), "--out", str(out), "block_size=4"]) == 0
    vocab = json.loads((qwen_dir / "config.json").read_text())["vocab_size"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("sdar", ["SDARForCausalLM"])
    # SDAR's (transformers 4) spelling, whichever format the source used
    assert (cfg["rope_theta"], cfg["torch_dtype"], cfg["head_dim"]) == (5000.0, "float32", 8)
    assert "rope_parameters" not in cfg and "dtype" not in cfg
    assert (cfg["block_size"], cfg["mask_token_id"], cfg["vocab_size"]) == (4, vocab, vocab + 1)
    assert (out / "generation_config.json").exists()
    state = load_file(str(out / "model.safetensors"))
    source_state = load_file(str(qwen_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the mask row is the mean row
        torch.testing.assert_close(state[name][vocab], source_state[name].mean(0), rtol=0, atol=1e-7)
        assert torch.equal(state[name][:vocab], source_state[name])

    model, tokenizer = load_pretrained(out, dtype="float32")
    assert tokenizer.mask_token_id == vocab and tokenizer.decode(tokenizer.encode("12+3=15")) == "12+3=15"
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(qwen_dir), attn_implementation="eager").float().eval()
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(17).expand(2, 17)
    with torch.no_grad():
        ours = model.eval()(ids, pos, TokenMeta.clean(pos, 1)).logits  # (B, T, V + 1)
        theirs = hf(input_ids=ids, position_ids=pos).logits  # (B, T, V)
    max_diff = (ours[..., :vocab] - theirs).abs().max().item()
    assert max_diff <= 1e-5, max_diff
    import dirl  # noqa: F401 -- registers dirl's classes: transformers loads the output with no remote code
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, model(ids, pos, TokenMeta.clean(pos, 4)).logits)

    run = tmp_path / "sft"
    assert cli_main(["sft", f"model={out}", f"out={run}", "data.source=task:arithmetic", "data.limit=64",
                     "data.max_length=64", "batch_size=4", "max_steps=20", "optim.lr=1e-3", "progress=false",
                     "save_every=0", "log_every=10"]) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    trained = load_pretrained(run / "final", with_tokenizer=False)[0].state_dict()
    start = model.state_dict()
    assert all(not torch.equal(trained[n], start[n]) for n in start if "layers" in n)


def test_convert_refuses_a_non_qwen3_directory(qwen_dir, tmp_path, capsys):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    (qwen_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert cli_main(["convert", str(qwen_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "llama" in err and len(err.strip().splitlines()) == 1


def test_convert_with_remote_code_loads_in_transformers(qwen_dir, tmp_path):
    sdar = tmp_path / "sdar-code"
    sdar.mkdir()
    (sdar / "configuration_sdar.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass SDARConfig(PretrainedConfig):\n"
        "    model_type = 'sdar'\n")
    (sdar / "config.json").write_text(json.dumps({"model_type": "sdar", "fuse_cross_entropy": True,
                                                  "hidden_size": 4096, "auto_map": {
        "AutoConfig": "configuration_sdar.SDARConfig"}}))
    out = tmp_path / "out"
    assert cli_main(["convert", str(qwen_dir), "--out", str(out), f"remote_code={sdar}"]) == 0
    assert (out / "configuration_sdar.py").read_bytes() == (sdar / "configuration_sdar.py").read_bytes()
    # The remote code named by auto_map loads (transformers' Auto classes prefer dirl's registered
    # class once `import dirl` ran -- transformers' rule for explicitly registered code -- so fetch it directly).
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    remote_cls = get_class_from_dynamic_module(auto_map["AutoConfig"], str(out))
    hf_config = remote_cls.from_pretrained(str(out))
    assert type(hf_config).__name__ == "SDARConfig" and hf_config.block_size == 4
    # the fields SDAR's code reads that Qwen3 lacks come along; the model's own shape stays
    assert hf_config.fuse_cross_entropy is True and hf_config.hidden_size == 32
    assert json.loads((out / "config.json").read_text())["auto_map"] == {"AutoConfig": "configuration_sdar.SDARConfig"}


def test_qwen3_defaults_are_transformers_own():
    """An absent field means what transformers' Qwen3Config makes of it (not SDAR's default)."""
    from dirl.model.sdar.convert import QWEN3_DEFAULTS, qwen3_fields

    theirs = transformers.Qwen3Config()
    for name, value in QWEN3_DEFAULTS.items():
        expected = theirs.rope_parameters["rope_theta"] if name == "rope_theta" else getattr(theirs, name)
        assert value == expected, name
    assert qwen3_fields({"model_type": "qwen3", "hidden_size": 64})["head_dim"] == 128

