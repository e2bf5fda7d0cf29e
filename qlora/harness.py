"""``qlora eval --harness TASK[,TASK]``: EleutherAI's lm-evaluation-harness (the ``harness`` extra, package
``lm_eval``) on the model ``qlora`` loaded (base + adapter, NF4 and all), not a second transformers copy.

:class:`QLoraLM` is the harness's model interface over our model and tokenizer: ``loglikelihood`` (the
harness's own context/continuation encoding, :class:`lm_eval.api.model.TemplateLM`), ``loglikelihood_rolling``
(its rolling windows, as its Hugging Face model does) and ``generate_until`` (greedy, cut at the stop
strings). Tasks are the harness's own or YAML files in ``--harness-include DIR``; their data sets are
loaded (:func:`load_tasks`) before the model, so an unknown task or data that is not available offline is
one line and nothing else runs.
"""
from __future__ import annotations

import importlib.util
import logging

from .errors import QLoraError

MISSING = "--harness: lm-evaluation-harness is not installed: pip install 'qlora[harness]' (or pip install lm_eval)"


def parse_tasks(text: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    if not names:
        raise QLoraError(f"--harness {text!r}: name at least one task (a comma list)")
    return names


def load_tasks(text: str, include: str | None = None) -> dict:
    """The harness's task objects for ``--harness TEXT`` (their data sets loaded), or one line saying why not."""
    if importlib.util.find_spec("lm_eval") is None:
        raise QLoraError(MISSING)
    names = parse_tasks(text)
    if include is not None:
        from pathlib import Path
        if not Path(include).is_dir():
            raise QLoraError(f"--harness-include {include}: not a folder of task YAML files")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would drown our one-line output
    from lm_eval.tasks import TaskManager, get_task_dict
    manager = None
    if include is not None:  # indexing the harness's thousands of YAML files takes seconds: only when needed
        manager = TaskManager(include_path=include, include_defaults=False)
        if not all(manager.match_tasks([n]) for n in names):
            manager = None
    manager = manager or TaskManager(include_path=include)
    for n in names:
        if not manager.match_tasks([n]):
            raise QLoraError(f"--harness: unknown task {n!r} (lm_eval --tasks list shows the harness's tasks; "
                             "your own YAML tasks go in --harness-include DIR)")
    try:
        return get_task_dict(names, manager)
    except Exception as e:  # datasets' errors for a missing data set are many (offline, not found, no file...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QLoraError(f"--harness {','.join(names)}: a task's data set could not be loaded (offline and not in "
                         f"the datasets cache, or missing): {type(e).__name__}: {first}") from None


def _lm_class():
    """QLoraLM, built on first use so that importing this module does not import lm_eval."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class QLoraLM(TemplateLM):
        """lm_eval's model interface over a loaded qlora model and its tokenizer."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256):
            super().__init__()
            from .generate import context_limit
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            limit = context_limit(model)
            self.max_length = min(max_length, limit) if limit else max_length
            self.max_gen_toks = max_gen_toks
            self._where = next(model.parameters()).device

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # as the harness's HF model: BOS where there is one
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def tok_decode(self, tokens) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

        @torch.no_grad()
        def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), continuation is the greedy one) per pair; the
            context is cut from the left to fit max_length. Batched right-padded, longest first."""
            out: list = [None] * len(pairs)
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
            order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(idx):
                    ids[r, :len(rows[i])] = torch.tensor(rows[i])
                    mask[r, :len(rows[i])] = 1
                logits = self.model(input_ids=ids.to(self._where), attention_mask=mask.to(self._where)).logits
                logp = F.log_softmax(logits.float(), dim=-1).cpu()
                for r, i in enumerate(idx):
                    cont = pairs[i][1]
                    end = len(rows[i])
                    lp = logp[r, end - len(cont):end]
                    want = torch.tensor(cont)
                    out[i] = (float(lp.gather(1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all()))
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self._scores([(ctx, cont) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Whole-string log-likelihood in disjoint windows of max_length (the harness's own windows)."""
            results = []
            for (string,) in [r.args for r in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                results.append(sum(lp for lp, _ in self._scores(windows)))
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy answers (our generation path), each cut at the first of its task's stop strings."""
            from .evaluate import greedy_answers
            answers = []
            for context, kw in [r.args for r in requests]:
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kw.get("max_gen_toks", self.max_gen_toks))
                prompt = self.tok_encode(context)[-max(1, self.max_length - new):]
                (text,) = greedy_answers(self.model, self.tokenizer, [prompt], max_new_tokens=new, batch_size=1)
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                answers.append(text)
            return answers

    return QLoraLM


def make_lm(model, tokenizer, batch_size: int = 8, max_length: int = 2048):
    return _lm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length)


def run(model, tokenizer, tasks: dict, limit: int | None = None, batch_size: int = 8, max_length: int = 2048,
        cache: bool = True) -> dict:
    """{task: {metric: value}} of the harness's evaluation of our model on the loaded ``tasks``
    (``cache``: the 16-bit copy of the 4-bit weights that qlora eval/generate keep while scoring)."""
    import torch
    from lm_eval.evaluator import evaluate

    from .generate import inference_cache
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_cache(model, cache):
            res = evaluate(make_lm(model, tokenizer, batch_size, max_length), tasks, limit=limit, bootstrap_iters=0,
                           log_samples=False, verbosity="WARNING")
    finally:
        model.train(was_training)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and "_stderr" not in k
                   and isinstance(v, (int, float))}
            for task, metrics in res["results"].items()}
