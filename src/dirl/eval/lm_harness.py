"""``dirl`` as an lm-evaluation-harness model, in process (``pip install 'lm-eval'``).

Importing this module registers the model name ``dirl`` with lm-eval::

    import dirl.eval.lm_harness  # noqa: F401 -- registers "dirl"
    import lm_eval
    lm_eval.simple_evaluate(model="dirl", model_args="pretrained=runs/x/final", tasks=[...])

* ``loglikelihood``: the exact left-to-right score of the continuation (one token per step,
  :mod:`dirl.model.left_to_right`), under the model's own distribution; ``is_greedy``: every
  continuation token is its state's argmax. The same numbers ``dirl serve`` gives with
  ``echo`` (the ``local-completions`` route).
* ``loglikelihood_rolling``: the same score over the whole text (the first token, which has no
  context, is scored after the EOS token, lm-eval's convention for an empty context).
* ``generate_until``: dirl's KV-cached engine, greedy unless the task sets a temperature;
  ``max_gen_toks`` and the ``until`` strings as the task gives them.

``model_args``: ``pretrained`` (a checkpoint directory), ``device`` (cpu), ``dtype`` (float32),
``max_gen_toks`` (256), ``unmasking`` / ``threshold`` / ``steps_per_block`` (the engine's).
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from dirl.engine.engine import Engine
from dirl.model.left_to_right import MODEL_DIST, left_to_right_trace, score_traces
from dirl.model.loading import load_model_spec
from dirl.rollout import SamplingSpec


@register_model("dirl")
class DirlLM(TemplateLM):
    """A dirl checkpoint scored and decoded in this process (module docstring)."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32", max_gen_toks: int = 256,
                 batch_size: int | str = 1, max_batch_size: int | None = None, **sampling):
        super().__init__()
        self.model, self.dirl_tokenizer = load_model_spec(pretrained, device=device, dtype=dtype)
        self.model.eval()
        self.tokenizer = self.dirl_tokenizer.hf  # lm-eval reads its chat template
        self.max_gen_toks = int(max_gen_toks)
        self.sampling = sampling
        self.engine = Engine(self.model)

    @property
    def eot_token_id(self) -> int:
        return self.dirl_tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "dirl").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.dirl_tokenizer.encode(string)

    def _score(self, token_ids: list[list[int]]):
        arch = self.model.arch
        pairs = [left_to_right_trace(ids, arch.block_size, arch.mask_token_id) for ids in token_ids]
        return score_traces(self.model, [t for t, _ in pairs], [c for _, c in pairs], MODEL_DIST, top=1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context, continuation in requests:
            ids = list(context) + list(continuation)
            (scored,) = self._score([ids])
            span = range(len(context), len(ids))
            greedy = all(scored.top[j][0][0] == ids[j] for j in span)
            out.append((float(sum(scored.logps[j] for j in span)), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            ids = [self.eot_token_id] + self.tok_encode(request.args[0])
            (scored,) = self._score([ids])
            out.append(float(sum(scored.logps[1:])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            spec = SamplingSpec(max_new_tokens=int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)),
                                temperature=float(gen_kwargs.pop("temperature", 0.0)), **self.sampling)
            params = spec.params(self.dirl_tokenizer.stop_ids(), seed=int(gen_kwargs.pop("seed", 0)))
            (rollout,) = self.engine.generate([self.tok_encode(context)], params)
            ids = rollout.completion_ids
            if ids and ids[-1] in params.stop_ids:
                ids = ids[:-1]
            text = self.dirl_tokenizer.decode(ids)
            cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
            out.append(text[: min(cuts)] if cuts else text)
        return out
