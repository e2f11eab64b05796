"""dirl's full-attention decoder against the public reference samplers, on the same weights.

Needs the reference code on disk (not shipped with dirl): ``--llada-generate`` ML-GSAI/LLaDA's
``generate.py``; ``--dream-code`` a folder with Dream's ``configuration_dream.py``,
``modeling_dream.py`` and ``generation_utils.py`` (e.g. ``models/Dream-v0-Instruct-7B`` of the
DARE repository). A tiny random LLaDA / Dream is made with ``dirl init``; Dream's reference model is
built from its own modeling file and loads dirl's state dict strictly (the names must match). Both
samplers see the model with [MASK]'s logit at -inf (a trained model never predicts it; dirl never
samples it). Greedy decoding of each prompt alone; prints ``<case>=identical|DIFFERENT`` and
``dream_remote_logits_max_diff`` (dirl's logits vs Dream's modeling file).

    python -m benchmarks.fullattn_reference --llada-generate PATH/generate.py --dream-code DIR
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

from dirl.engine.engine import Engine
from dirl.model.checkpoint import load_pretrained
from dirl.model.factory import InitConfig, init_checkpoint
from dirl.model.forward import Readout
from dirl.rollout import SamplingParams

PROMPTS = [[5, 9, 12, 13, 7, 20, 31], [20, 4, 33], [8, 8, 30, 12, 11, 6, 14, 9, 40, 41]]


class NoMask(torch.nn.Module):
    """A model whose [MASK] logit is -inf, callable both as dirl's model and as LLaDA's (``.logits``)."""

    def __init__(self, inner, mask_id):
        super().__init__()
        self.inner, self.mask_id, self.device = inner, mask_id, torch.device("cpu")
        self.arch, self.config = inner.arch, inner.config

    def forward(self, input_ids, position_ids=None, meta=None, cache=None, readout=Readout(), attn_impl=None,
                attention_mask=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        out = self.inner(input_ids, position_ids, meta, cache=cache, readout=readout, attn_impl=attn_impl)
        out.logits[..., self.mask_id] = float("-inf")
        return out


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_llada(generate_py: Path, ckpt: Path) -> None:
    model, _ = load_pretrained(ckpt)
    mask = model.arch.mask_token_id
    wrapped, reference = NoMask(model.eval(), mask), _module(generate_py, "llada_reference_generate")
    for steps, length, block in [(8, 16, 4), (16, 16, 8), (6, 12, 12)]:
        params = SamplingParams(max_new_tokens=length, temperature=0.0, unmasking="low_confidence",
                                steps_per_block=steps // (length // block), block_length=block)
        same = True
        for prompt in PROMPTS:
            ours = Engine(wrapped).generate([prompt], params)[0].token_ids
            with torch.no_grad():
                theirs = reference.generate(wrapped, torch.tensor([prompt]), steps=steps, gen_length=length,
                                            block_length=block, temperature=0.0, remasking="low_confidence",
                                            mask_id=mask)
            same &= theirs[0, len(prompt):].tolist() == ours
        print(f"llada_low_confidence_steps{steps}_len{length}_block{block}={'identical' if same else 'DIFFERENT'}")


def _dream_reference(code: Path, ckpt: Path, model):
    """Dream's own model class (its modeling file, as a package for its relative imports) on dirl's weights."""
    fake = types.ModuleType("flash_attn")  # the modeling file imports it unconditionally
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_func = fake.flash_attn_varlen_func = fake.flash_attn_with_kvcache = None
    sys.modules.setdefault("flash_attn", fake)
    import transformers.modeling_rope_utils as rope_utils  # transformers >= 5 dropped "default"

    def default_rope(config, device=None, seq_len=None, **_):
        dim = config.hidden_size // config.num_attention_heads
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim)), 1.0

    rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)
    package = Path(tempfile.mkdtemp()) / "dream_reference"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_dream.py", "modeling_dream.py", "generation_utils.py"):
        (package / name).write_bytes((code / name).read_bytes())
    sys.path.insert(0, str(package.parent))
    config_mod = importlib.import_module("dream_reference.configuration_dream")
    modeling = importlib.import_module("dream_reference.modeling_dream")
    gen_utils = importlib.import_module("dream_reference.generation_utils")
    gen_utils.DreamGenerationConfig.validate = lambda self, *a, **k: None  # transformers >= 5 passes new kwargs
    cfg = config_mod.DreamConfig(**json.loads((ckpt / "config.json").read_text()))
    cfg._attn_implementation, cfg.use_cache = "sdpa", False
    theirs = modeling.DreamModel(cfg).float().eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs, gen_utils


def check_dream(code: Path, ckpt: Path) -> None:
    model, _ = load_pretrained(ckpt)
    model.eval()
    mask = model.arch.mask_token_id
    theirs, gen_utils = _dream_reference(code, ckpt, model)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        diff = (model(ids, torch.arange(ids.shape[1])[None], None).logits - theirs(ids).logits).abs().max()
    print(f"dream_remote_logits_max_diff={float(diff):.3g}")
    forward = theirs.forward

    def no_mask(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., mask] = float("-inf")
        return out

    theirs.forward, wrapped = no_mask, NoMask(model, mask)
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        same = True
        for steps, length in [(8, 16), (5, 9)]:
            params = SamplingParams(max_new_tokens=length, temperature=0.0, unmasking=alg, steps_per_block=steps,
                                    block_length=length)
            for prompt in PROMPTS:
                ours = Engine(wrapped).generate([prompt], params)[0].token_ids
                gc = gen_utils.DreamGenerationConfig(max_new_tokens=length, steps=steps, temperature=0.0, alg=alg,
                                                     alg_temp=0.0, mask_token_id=mask, eps=1e-3,
                                                     return_dict_in_generate=True, bos_token_id=0, eos_token_id=0,
                                                     pad_token_id=0)
                theirs.generation_config = gc
                with torch.no_grad():
                    out = theirs.diffusion_generate(torch.tensor([prompt]), generation_config=gc)
                same &= out.sequences[0, len(prompt):].tolist() == ours
        print(f"dream_{alg}={'identical' if same else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llada-generate", type=Path, help="ML-GSAI/LLaDA generate.py")
    parser.add_argument("--dream-code", type=Path, help="folder with Dream's modeling and generation files")
    parser.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`; "
                        "without the reference paths nothing runs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    for family, given in (("llada", args.llada_generate), ("dream", args.dream_code)):
        if given is None:
            continue
        ckpt = work / family
        init_checkpoint(InitConfig(family=family, preset="tiny", seed=0), ckpt)
        (check_llada if family == "llada" else check_dream)(given, ckpt)


if __name__ == "__main__":
    main()
