"""The ``tfb`` command line (library part): ``predict``, ``generate``, ``search`` and ``eval``.

``tfb serve`` is added by :mod:`app.cli`, which owns the console script, so that this package
stays free of web imports. Errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tfb_core.config import CRITERIA, DEFAULT_MODEL, DTYPES, ModelConfig, SearchConfig
from tfb_core.data.jsonl import read_jsonl
from tfb_core.data.loading import LoadError
from tfb_core.data.tasks import TaskError
from tfb_core.evaluation.classification import EvalOptions, run_eval
from tfb_core.forward.completion import MODES
from tfb_core.model import BayesianModel
from tfb_core.search.generation import read_anchor
from tfb_core.search.strategy import GENERATION_SEARCH
from tfb_core.serving.config import DEMO_GENERATIVE_ADAPTER, EngineConfig
from tfb_core.serving.startup import load_engine

log = logging.getLogger("tfb")
_SEARCH = SearchConfig()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that loads a model (``predict``, ``search``, ``eval``, ``serve``)."""
    g = p.add_argument_group("model and adapter")
    g.add_argument("--published", default=None, metavar="METHOD/DATASET/SEED",
                   help="a published TFB adapter (FlyLee/bayesian-peft on Llama-3.1-8B), e.g. mle/winogrande_s/1: "
                        "methods mle, map, blob; data sets winogrande_s, winogrande_m, ARC-Challenge, ARC-Easy, obqa, "
                        "boolq; seeds 1, 2, 3. Sets adapter, base model, task and the reference anchor")
    g.add_argument("--model", default=None, help=f"base model: local folder, hub id or pip:<wheel> (default {DEFAULT_MODEL})")
    g.add_argument("--model-revision", default=None)
    g.add_argument("--model-subfolder", default=None)
    g.add_argument("--gguf-file", default=None, help="load the base model from this GGUF file of the repository")
    g.add_argument("--adapter", default=None, help="peft LoRA adapter: local folder or hub id (default: the demo adapter)")
    g.add_argument("--adapter-revision", default=None)
    g.add_argument("--adapter-subfolder", default=None, help="subfolder of the adapter repository")
    g.add_argument("--dtype", choices=DTYPES, default=None)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    g.add_argument("--load-in-8bit", action="store_true", default=None, help="bitsandbytes 8-bit base model (CUDA)")
    g.add_argument("--cache-dir", default=None, help="converted models and sigma searches (default ~/.cache/tfb-serve)")
    g.add_argument("--max-length", type=int, default=None, help="maximum prompt length in tokens")
    t = p.add_argument_group("task")
    t.add_argument("--task", default=None, help="winogrande, arc_challenge, arc_easy, openbookqa, boolq, sst2")
    t.add_argument("--labels", nargs="+", default=None, help="class labels of the generic task (single tokens)")
    s = p.add_argument_group("posterior and sampling")
    s.add_argument("--sigma", type=float, default=None, help="fixed sigma (default: from the cache or a search)")
    s.add_argument("--samples", type=int, default=None, help="Monte Carlo samples N (default 10)")
    s.add_argument("--seed", type=int, default=None, help="seed of the posterior samples (default 0)")
    s.add_argument("--anchor", default=None, help="JSONL anchor set for the sigma search (default for --published "
                   "and the paper's tasks: 500 training records shuffled with seed 42, read with datasets and cached)")
    s.add_argument("--calibration", default=None,
                   help="labelled JSONL for prediction sets and abstention (default: none, or a held-out share "
                        "of a labelled anchor with TFB_CALIBRATION_SPLIT)")
    s.add_argument("--criterion", choices=CRITERIA, default=None, help=f"search criterion (default {_SEARCH.criterion})")
    s.add_argument("--tolerance", type=float, default=None,
                   help=f"search tolerance (default {_SEARCH.tolerance} for a classifier, "
                        f"{GENERATION_SEARCH.tolerance} for a generative adapter)")
    s.add_argument("--low", type=float, default=None, help=f"lower end of the sigma bracket (default {_SEARCH.low})")
    s.add_argument("--high", type=float, default=None, help=f"upper end of the sigma bracket (default {_SEARCH.high})")
    s.add_argument("--iters", type=int, default=None, help=f"bisection steps (default {_SEARCH.iters})")
    s.add_argument("--rtol", type=float, default=None,
                   help=f"stop once the criterion is within this fraction of the tolerance (default {_SEARCH.rtol})")
    s.add_argument("--search-samples", type=int, default=None, help=f"N during the search (default {_SEARCH.n_samples})")
    s.add_argument("--search-method", choices=("bisect", "grid"), default=None)
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag, None) is not None}


MODEL_FLAGS = {"model": "model", "model_revision": "model_revision", "model_subfolder": "model_subfolder",
               "gguf_file": "gguf_file", "adapter": "adapter", "adapter_revision": "adapter_revision",
               "adapter_subfolder": "adapter_subfolder", "dtype": "dtype", "device": "device",
               "load_in_8bit": "load_in_8bit", "cache_dir": "cache_dir", "max_length": "max_length"}
SEARCH_FLAGS = {"criterion": "criterion", "tolerance": "tolerance", "low": "low", "high": "high", "iters": "iters",
                "rtol": "rtol",
                "search_samples": "n_samples", "search_method": "method", "seed": "seed"}


def engine_config_from_args(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """An :class:`EngineConfig` from the flags given, on top of ``base`` (e.g. environment settings)."""
    base = base or EngineConfig()
    model = ModelConfig(**{**base.model.__dict__, **_given(args, MODEL_FLAGS)})
    top = _given(args, {"published": "published", "task": "task", "sigma": "sigma", "anchor": "anchor",
                        "calibration": "calibration",
                        "samples": "n_samples", "seed": "seed"})
    if getattr(args, "labels", None):
        top["labels"] = tuple(args.labels)
    cfg = EngineConfig(**{**base.__dict__, "model": model, **top})
    return cfg.with_search(**_given(args, SEARCH_FLAGS))  # unset: the default search of the adapter's kind


def _load_inputs(args: argparse.Namespace) -> list[Any]:
    inputs: list[Any] = list(args.prompt or [])
    for path in args.input or []:
        inputs += read_jsonl(path)
    if not inputs:
        raise LoadError("no inputs: give --prompt TEXT (repeatable) or --input FILE.jsonl")
    return inputs


def cmd_predict(args: argparse.Namespace) -> int:
    inputs = _load_inputs(args)
    m = BayesianModel.from_config(engine_config_from_args(args), progress=True)
    out = m.predict(inputs, n_samples=args.samples, seed=args.seed, return_samples=args.return_samples,
                    alpha=args.alpha, max_risk=args.max_risk)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"sigma={out['sigma']:.6g} ({m.sigma_source})  N={out['n_samples']}  labels={out['labels']}")
        for p in out["predictions"]:
            print(f"{p['label']:>12}  conf={p['confidence']:.3f}  H={p['predictive_entropy']:.3f}  "
                  f"aleatoric={p['expected_entropy']:.3f}  MI={p['mutual_information']:.4f}"
                  + (f"  set={p['prediction_set']}" if "prediction_set" in p else "")
                  + (f"  abstain={p['abstain']}" if "abstain" in p else ""))
    return 0


def _generation_inputs(args: argparse.Namespace) -> list[Any]:
    """The prompts of ``tfb generate``: each ``--prompt`` text (``--chat``: as one user message), then
    each ``--input`` file's lines (``{"prompt": text}`` or ``{"messages": [...]}``, as an anchor file's)."""
    prompts: list[Any] = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt or []]
    for path in args.input or []:
        prompts += [r["prompt"] if "prompt" in r else r["messages"] for r in read_anchor(path)]
    if not prompts:
        raise LoadError('no prompts: give --prompt TEXT (repeatable) or --input FILE.jsonl of {"prompt": ...} '
                        'or {"messages": [...]} lines')
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    """``tfb generate``: a generative adapter's answers with their uncertainty (the library's
    :meth:`~tfb_core.model.BayesianModel.generate`; one JSON object with ``--json``)."""
    prompts = _generation_inputs(args)
    if args.adapter is None and args.published is None and args.model in (None, DEFAULT_MODEL):
        args.adapter = str(DEMO_GENERATIVE_ADAPTER)  # the embedded default's generative adapter, as served
    m = BayesianModel.from_config(engine_config_from_args(args), progress=True)
    results = m.generate(prompts, n_samples=args.samples, seed=args.seed, max_tokens=args.max_tokens,
                         temperature=args.temperature, answers=args.answers, sampling_seed=args.sampling_seed)
    if args.json:
        print(json.dumps({"adapter": m.name, "sigma": m.sigma, "sigma_source": m.sigma_source, "results": results}))
        return 0
    print(f"sigma={m.sigma:.6g} ({m.sigma_source})  N={results[0]['n_samples']}  answers={args.answers}")
    for r in results:
        c = r["completion"]
        q = c["sequence"]
        print(f"{c['text']!r}  finish={c['finish_reason']}  nll={q['nll']:.3f}  "
              f"MI mean={q['mean_mutual_information']:.4f} max={q['max_mutual_information']:.4f}"
              + (f"  semantic_entropy={r['answers']['semantic_entropy']:.3f}" if "answers" in r else ""))
        for t in c["tokens"]:
            print(f"    {t['token']!r:>12}  p={t['prob']:.3f}  H={t['predictive_entropy']:.3f}  "
                  f"MI={t['mutual_information']:.4f}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    cfg = engine_config_from_args(args)
    if cfg.sigma is not None:
        raise LoadError("--sigma fixes sigma: there is nothing to search")
    engine = load_engine(cfg)
    result = engine.search_result
    assert result is not None
    out = {"sigma": engine.sigma, "source": engine.sigma_source, **result.to_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"sigma = {engine.sigma:.6g} ({engine.sigma_source}); {result.criterion} = {result.value:.4g} "
              f"<= {result.tolerance:g}; {result.n_evaluations} evaluations in {result.seconds:.1f}s")
        for pt in sorted(result.history, key=lambda p: p.sigma):
            print(f"  sigma={pt.sigma:.6g}  {result.criterion}={pt.value:.4g}  {'ok' if pt.ok else 'over'}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tfb eval`` flags (on top of the shared model/task/search flags of the CLI)."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--test-file", default=None, metavar="F.jsonl",
                   help="evaluate on these labelled records (the task's fields, or prompt and label for the generic "
                        "task) instead of a built-in split")
    g.add_argument("--test-split", default="test", help="split of the task's data to evaluate on (default test)")
    g.add_argument("--limit", type=int, default=None, help="evaluate on the first N test records")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the half of the test records that fits prediction sets and abstention thresholds "
                        "when no --calibration (or TFB_CALIBRATION) file is given (default 0)")
    g.add_argument("--anchor-split", default="anchor", help="anchor split when no --anchor file is given")
    g.add_argument("--anchor-limit", type=int, default=None,
                   help="anchor: this many records of --anchor-split, shuffled with seed 42 (reference: 500 of train)")
    g.add_argument("--ood-task", default=None, help="OOD data set (e.g. boolq, arc_easy) fed through the task's prompt")
    g.add_argument("--ood-split", default="validation")
    g.add_argument("--ood-file", default=None, metavar="G.jsonl",
                   help="OOD inputs (JSON Lines; labels not needed) instead of --ood-task")
    g.add_argument("--ood-field", default="question", help="field of the OOD records used as the input text")
    g.add_argument("--ood-limit", type=int, default=None, help="OOD records (default: as many as test records)")
    g.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0: none)")
    g.add_argument("--max-rows", type=int, default=64, help="rows (prompt x sample) per forward")
    g.add_argument("--plot", default=None, help="write the reliability diagram PNG here (and the risk-coverage "
                   "curves beside it, as NAME_risk_coverage.png)")
    g.add_argument("--output", default=None, help="write the JSON result here (also printed to stdout)")


def cmd_eval(args: argparse.Namespace) -> int:
    """``tfb eval``: print the JSON result to stdout and the table to stderr."""
    if args.ood_file and args.ood_task:
        raise ValueError("give --ood-file or --ood-task, not both")
    if args.calibration is None and os.environ.get("TFB_CALIBRATION"):
        args.calibration = os.environ["TFB_CALIBRATION"]
    cfg = engine_config_from_args(args)
    opts = EvalOptions(test_split=args.test_split, limit=args.limit, anchor_split=args.anchor_split,
                       ood_task=args.ood_task, ood_split=args.ood_split, ood_field=args.ood_field,
                       ood_limit=args.ood_limit, anchor_limit=args.anchor_limit, n_boot=args.bootstrap,
                       max_rows=args.max_rows, plot=args.plot, output=args.output, test_file=args.test_file,
                       ood_file=args.ood_file, split_seed=args.split_seed, conformal_score=cfg.conformal_score,
                       conformal_mondrian=cfg.conformal_mondrian, risk_delta=cfg.risk_delta)
    result = run_eval(cfg, opts)
    print(json.dumps(result))
    return 0


def _open_unit(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number in (0, 1), got {text!r}") from None
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be in (0, 1), got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfb", description="Training-Free Bayesianization of LoRA adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict with uncertainty")
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", help="an input prompt (generic task) ; repeatable")
    p.add_argument("--input", action="append", help="JSONL file of inputs (prompt strings' objects or task records)")
    p.add_argument("--return-samples", action="store_true", help="include the per-sample probabilities")
    p.add_argument("--alpha", type=_open_unit("--alpha"), default=None,
                   help="add a conformal prediction set of coverage >= 1 - alpha to each prediction")
    p.add_argument("--max-risk", type=_open_unit("--max-risk"), default=None,
                   help="add abstain: error among answered inputs <= max_risk (w.p. >= 1 - TFB_RISK_DELTA)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_predict)
    g = sub.add_parser("generate", help="generate with uncertainty (a generative adapter; default: the embedded "
                                        "default model's arith-mle)")
    add_model_arguments(g)
    g.add_argument("--prompt", action="append", help="a text to continue; repeatable")
    g.add_argument("--chat", action="store_true", help="send each --prompt as one user message (chat template)")
    g.add_argument("--input", action="append",
                   help='JSONL file of {"prompt": text} or {"messages": [...]} lines (rendered with the chat template)')
    g.add_argument("--max-tokens", type=int, default=16, help="most tokens per answer (default 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="applied to the mean of the samples (0: greedy)")
    g.add_argument("--sampling-seed", type=int, default=0, help="seed of the token draws at temperature > 0")
    g.add_argument("--answers", choices=MODES, default="mean",
                   help="mean: one answer from the samples' mean; per_sample: each sample's own answer, clustered")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("search", help="search sigma on an anchor set (or load it from the cache)")
    add_model_arguments(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)
    e = sub.add_parser("eval", help="evaluate MLE against TFB (and temperature scaling) on a data set or --test-file")
    add_model_arguments(e)
    add_eval_arguments(e)
    e.set_defaults(func=cmd_eval)
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (LoadError, TaskError, ValueError, FileNotFoundError) as exc:
        print(f"tfb {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
