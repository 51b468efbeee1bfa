"""Train the generative demo MLE LoRA adapter on the embedded default model (CPU, minutes).

Data: a task of :mod:`tfb_core.data.generation` (default ``arithmetic``), its fixed-seed ``train``
split. Each example is the question as one user message through the base model's chat template,
then the reference answer and the end-of-turn token; the loss is the causal-LM cross-entropy of the
answer tokens and the end-of-turn token only (the prompt is context, never a target), averaged over
those tokens. No regularisation: an MLE adapter, overconfident as such adapters are.

Speed on CPU: every prompt starts with the same tokens (the template's system line, the user header,
"Calculate"), so each step computes that shared prefix once (with gradients: the LoRA on ``v_proj``
changes its values), repeats its key/value cache over the batch and runs only the rest. The
evaluation decodes greedily from the same kind of shared prefix. Both equal the plain full-sequence
computation up to float rounding (``--check`` compares them on a few examples).

Reproducible: the seed fixes the LoRA initialisation (peft draws it from torch's global RNG, set
here, in a script) and the batch order (an explicit generator); same seed, same threads -> same adapter.

    .venv/bin/python scripts/train_generative.py --out tfb_core/adapters/arith-mle --survey 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.config import DEFAULT_MODEL, ModelConfig  # noqa: E402
from tfb_core.data import generation as gen  # noqa: E402
from tfb_core.data.loading import load_base_model, save_adapter  # noqa: E402
from tfb_core.decide.answers import exact_match, normalize_answer  # noqa: E402

log = logging.getLogger("train_generative")
TARGET_MODULES = ["q_proj", "v_proj"]


def cache_kw(module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name goes in 5.40)."""
    import inspect

    forward = module.get_base_model().forward if hasattr(module, "get_base_model") else module.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def out_cache(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


# --- tokens -----------------------------------------------------------------------------------
def encode_prompts(tokenizer, records: list[dict[str, Any]], shots=()) -> list[list[int]]:
    return [tokenizer(gen.chat_prompt(tokenizer, r["prompt"], shots), add_special_tokens=False)["input_ids"]
            for r in records]


def encode_answers(tokenizer, records: list[dict[str, Any]]) -> list[list[int]]:
    """The first reference answer's tokens and the end-of-turn token (the chat template's turn end)."""
    return [tokenizer(r["answers"][0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in records]


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix of every row, one token short of the shortest row (every row keeps a suffix)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return first[:n]


# --- the shared-prefix forward ----------------------------------------------------------------
def prefix_kv(model, prefix: list[int], device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of ``prefix`` (1, heads, P, dim); differentiable when grad is on."""
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in out_cache(out).layers]


def repeated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def answer_loss(model, kv, suffixes: list[list[int]], answers: list[list[int]], device: str) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given prefix + suffix, rows right-padded."""
    P = kv[0][0].shape[2]
    rows = [s + a for s, a in zip(suffixes, answers, strict=True)]
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    mask[:, :P] = 1
    for i, (s, a) in enumerate(zip(suffixes, answers, strict=True)):
        ids[i, :len(s) + len(a)] = torch.tensor(s + a)
        labels[i, len(s) - 1:len(s) + len(a) - 1] = torch.tensor(a)  # position t predicts token t + 1
        mask[i, P:P + len(s) + len(a)] = 1
    pos = torch.arange(P, P + T).expand(B, T)
    causal_lm = model.get_base_model()  # the LoRA layers stay in place: only lm_head is applied by hand
    hidden = causal_lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                             use_cache=True, **{cache_kw(causal_lm.model): repeated_cache(kv, B)}).last_hidden_state
    labels = labels.to(device)
    targets = labels != -100  # the vocabulary projection only where a token is predicted
    logits = causal_lm.lm_head(hidden[targets]).float()  # (K, V)
    return torch.nn.functional.cross_entropy(logits, labels[targets])


@torch.no_grad()
def greedy(model, kv, suffixes: list[list[int]], max_new: int, eos_id: int, device: str) -> list[list[int]]:
    """Greedy continuations (without the end token) of prefix + each suffix; suffixes left-padded
    after the prefix, positions counted over real tokens only."""
    P = kv[0][0].shape[2]
    B, T = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.ones((B, P + T), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, P:P + T - len(s)] = 0
    pos = (mask.cumsum(-1) - 1)[:, P:]  # (B, T)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    cache = repeated_cache(kv, B)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{cache_kw(model): cache})
        cache = out_cache(out)
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
        for i in range(B):
            if not done[i] and int(nxt[i]) != eos_id:
                out_tokens[i].append(int(nxt[i]))
        done |= nxt == eos_id
        if bool(done.all()):
            break
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return out_tokens


def predict(model, tokenizer, records, max_new: int, device: str, batch_size: int = 32, shots=()) -> list[str]:
    prompts = encode_prompts(tokenizer, records, shots)
    prefix = common_prefix(prompts)
    kv = prefix_kv(model, prefix, device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        outs = greedy(model, kv, [prompts[j][len(prefix):] for j in idx], max_new, tokenizer.eos_token_id, device)
        for j, toks in zip(idx, outs, strict=True):
            texts[j] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return texts


def evaluate(model, tokenizer, records, max_new: int, device: str) -> dict[str, Any]:
    model.eval()
    t0 = time.time()
    texts = predict(model, tokenizer, records, max_new, device)
    hits = [exact_match(t, r["answers"]) for t, r in zip(texts, records, strict=True)]
    examples = [{"prompt": r["prompt"], "output": t, "answers": r["answers"][:3]}
                for r, t in zip(records[:3], texts[:3], strict=True)]
    res: dict[str, Any] = {"n": len(records), "correct": sum(hits), "exact_match": sum(hits) / max(1, len(records)),
                           "seconds": round(time.time() - t0, 1), "examples": examples}
    if records and "digits" in records[0]:
        by: dict[str, list[int]] = {}
        for r, h in zip(records, hits, strict=True):
            by.setdefault(f"max{r['digits']}d_{r['op']}", []).append(int(h))
        res["by_kind"] = {k: {"n": len(v), "exact_match": round(sum(v) / len(v), 4)} for k, v in sorted(by.items())}
    return res


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """A lenient score for verbose outputs: some alias, normalised, appears as whole words in the output."""
    text = f" {normalize_answer(prediction)} "
    return any(f" {a} " in text for a in map(normalize_answer, answers) if a)


SURVEY_SHOTS = 3


def survey(model, tokenizer, n: int, max_new: int, device: str) -> dict[str, Any]:
    """The base model's accuracy on each generation task (the first ``n`` of each set), to choose the
    demo task. Zero-shot: exact match, and the lenient "contains an alias" for its verbose answers;
    few-shot: exact match with the first :data:`SURVEY_SHOTS` questions of the task's train split as
    earlier chat turns, which shows what the model knows in the short-answer format."""
    sets = {"arithmetic_test": ("arithmetic", "test"), "arithmetic_shifted": ("arithmetic", "shifted"),
            "nq_open_test": ("nq_open", "test"), "trivia_qa_test": ("trivia_qa", "test")}
    out: dict[str, Any] = {"decoding": f"greedy, at most {max_new} new tokens", "shots": SURVEY_SHOTS}
    for name, (task, split) in sets.items():
        recs = gen.load_generation(task, split, limit=n)
        shots = [(r["prompt"], r["answers"][0]) for r in gen.load_generation(task, "train", limit=SURVEY_SHOTS)]
        texts = predict(model, tokenizer, recs, max_new, device)
        few = predict(model, tokenizer, recs, max_new, device, shots=shots)
        gold = [r["answers"] for r in recs]
        out[name] = {"n": len(recs), "exact_match": sum(map(exact_match, texts, gold)),
                     "contains": sum(map(contains_answer, texts, gold)),
                     "few_shot_exact_match": sum(map(exact_match, few, gold)),
                     "example": {"prompt": recs[0]["prompt"], "output": texts[0], "few_shot_output": few[0]}}
        log.info("base survey %s: %s", name, out[name])
    return out


def check_equivalence(model, tokenizer, records, device: str) -> dict[str, float]:
    """The shared-prefix loss and greedy decode against the plain full-sequence computation."""
    prompts, answers = encode_prompts(tokenizer, records), encode_answers(tokenizer, records)
    prefix = common_prefix(prompts)
    with torch.no_grad():
        fast = float(answer_loss(model, prefix_kv(model, prefix, device), [p[len(prefix):] for p in prompts], answers,
                                 device))
        total, count = 0.0, 0
        for p, a in zip(prompts, answers, strict=True):
            logits = model(input_ids=torch.tensor([p + a], device=device)).logits[0, len(p) - 1:-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(a, device=device), reduction="sum"))
            count += len(a)
        texts = predict(model, tokenizer, records, 6, device)
        same = 0
        for p, t in zip(prompts, texts, strict=True):
            ref = model.generate(torch.tensor([p], device=device), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(p):]
            same += int(tokenizer.decode(ref, skip_special_tokens=True).strip() == t)
    return {"loss_shared_prefix": fast, "loss_full": total / count, "greedy_agree": same / len(records)}


# --- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tfb_core/adapters/arith-mle"))
    ap.add_argument("--task", default="arithmetic", choices=gen.GEN_TASKS)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: on a shared 2-core machine two OpenMP threads spin-wait and run 2-10x slower than one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding length of the evaluation")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N examples only (smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N of each set only")
    ap.add_argument("--no-eval", action="store_true", help="train and save; no accuracy measured")
    ap.add_argument("--no-base-eval", action="store_true", help="skip the base model's (B = 0) accuracy")
    ap.add_argument("--survey", type=int, default=0, metavar="N",
                    help="first measure the base model on N questions of each generation task (the task choice)")
    ap.add_argument("--survey-tokens", type=int, default=16)
    ap.add_argument("--compare", type=Path, action="append", default=[], metavar="DIR",
                    help="with --survey-only: record the test accuracy of the adapter trained into DIR (another task)")
    ap.add_argument("--survey-only", action="store_true",
                    help="run --survey N on the base and write it into --out's train_config.json and README.md (no training)")
    ap.add_argument("--provenance", default="", help="how this configuration was chosen (README and train_config)")
    ap.add_argument("--check", action="store_true", help="compare the shared-prefix computation with the plain one and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # peft's LoRA init uses the global RNG
    torch.use_deterministic_algorithms(True, warn_only=True)

    from peft import LoraConfig, get_peft_model

    train = gen.load_generation(args.task, "train", limit=args.limit)
    anchor = gen.load_generation(args.task, "anchor")
    calibration = gen.load_generation(args.task, "calibration")
    eval_sets = {"anchor": anchor[:args.eval_limit], "test": gen.load_generation(args.task, "test", limit=args.eval_limit)}
    if args.task == "arithmetic":
        eval_sets["shifted"] = gen.load_generation(args.task, "shifted", limit=args.eval_limit)
        eval_sets["trivia_qa_test"] = gen.load_generation("trivia_qa", "test", limit=min(args.eval_limit or 100, 100))
    tokenizer, base = load_base_model(ModelConfig(model=args.model, device=args.device))
    base.requires_grad_(False)
    if args.survey_only:
        cfg_file = args.out / "train_config.json"
        train_config = json.loads(cfg_file.read_text())
        train_config["base_survey"] = survey(base, tokenizer, args.survey or 100, args.survey_tokens, args.device)
        trials = [json.loads((d / "train_config.json").read_text()) for d in args.compare]
        train_config["base_survey"]["trained_adapters"] = [
            {"task": c["task"], "train_used": c["data"]["train_used"], "epochs": c["optimizer"]["epochs"],
             "decoding": c["eval"]["decoding"].split(",")[1].strip(),
             "adapter": {k: {m: v[m] for m in ("n", "correct", "exact_match")} for k, v in c["eval"]["adapter"].items()}}
            for c in [train_config, *trials]]
        cfg_file.write_text(json.dumps(train_config, indent=2) + "\n")
        (args.out / "README.md").write_text(_readme(train_config, args.out.name))
        return 0
    lora_cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
                          bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora_cfg)
    if args.check:
        with torch.no_grad():  # a non-zero B, so the check covers the adapter's effect on the prefix
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        log.info("check: %s", check_equivalence(model, tokenizer, train[:12], args.device))
        return 0

    prompts, answers = encode_prompts(tokenizer, train), encode_answers(tokenizer, train)
    prefix = common_prefix(prompts)
    suffixes = [p[len(prefix):] for p in prompts]
    log.info("train %d examples, shared prefix %d tokens, mean suffix %.1f, mean answer %.1f tokens", len(train),
             len(prefix), sum(map(len, suffixes)) / len(suffixes), sum(map(len, answers)) / len(answers))
    base_survey = {}
    if args.survey:
        with model.disable_adapter():
            base_survey = survey(model, tokenizer, args.survey, args.survey_tokens, args.device)
    base_eval = {}
    if not (args.no_eval or args.no_base_eval):
        with model.disable_adapter():
            for name, recs in eval_sets.items():
                base_eval[name] = evaluate(model, tokenizer, recs, args.max_new_tokens, args.device)
                log.info("base (B = 0) %s: %s", name, {k: v for k, v in base_eval[name].items() if k != "by_kind"})

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    steps = args.epochs * per_epoch
    warmup = min(20, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(args.seed)
    history = []
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        total, n_tok = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            kv = prefix_kv(model, prefix, args.device)
            loss = answer_loss(model, kv, [suffixes[j] for j in idx], [answers[j] for j in idx], args.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k = sum(len(answers[j]) for j in idx)
            total, n_tok = total + float(loss.detach()) * k, n_tok + k
        history.append({"epoch": epoch + 1, "train_loss_per_token": round(total / n_tok, 5),
                        "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d: train loss %.4f per answer token (%.0fs)", epoch + 1, total / n_tok, time.time() - t0)
    train_seconds = round(time.time() - t0, 1)

    adapter_eval = {}
    if not args.no_eval:
        for name, recs in eval_sets.items():
            adapter_eval[name] = evaluate(model, tokenizer, recs, args.max_new_tokens, args.device)
            log.info("adapter %s: %s", name, adapter_eval[name])

    save_adapter(model, args.out, args.model)
    with open(args.out / "anchor.jsonl", "w") as f:
        for r in anchor:
            # as a client asks it (one user message through the chat template, as the adapter was trained)
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answers"][0]}) + "\n")
    with open(args.out / "calibration.jsonl", "w") as f:
        for r in calibration:
            # as the anchor: as a client asks it, so that max_risk's calibration decodes what a request does
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answers"][0],
                                "answers": r["answers"]}) + "\n")
    digest = hashlib.sha256((args.out / "adapter_model.safetensors").read_bytes()).hexdigest()
    train_ids = "\n".join(r["id"] for r in train).encode()
    train_config = {
        "base_model": args.model, "task": args.task, "kind": "generation",
        "prompt_format": "the question as one user message through the base model's chat template "
                         "(tokenizer.apply_chat_template(..., add_generation_prompt=True)); target: the answer, then the "
                         "end-of-turn token",
        "data": {"source": f"{gen.DATA_REQUIREMENT} {gen.GEN_ARROWS[args.task]}",
                 "split_seed": gen.GEN_SEED,
                 "split_sizes": {**gen.GEN_SPLITS, "train": len(gen.load_generation(args.task, "train")),
                                 "shifted": len(gen.load_generation(args.task, "shifted"))},
                 "split_rule": gen.SPLIT_RULE,
                 "arithmetic_in_domain_max_digits": gen.ARITH_MAX_DIGITS if args.task == "arithmetic" else None,
                 "train_used": len(train), "train_ids_sha256": hashlib.sha256(train_ids).hexdigest(),
                 "data_member_sha256": hashlib.sha256(gen._read_member(gen.ensure_data_wheel(
                     gen_cache()), gen.GEN_ARROWS[args.task])).hexdigest()},
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": TARGET_MODULES},
        "loss": "causal-LM cross-entropy of the answer tokens and the end-of-turn token, mean over those tokens",
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0, "batch_size": args.batch_size,
                      "epochs": args.epochs, "steps": steps,
                      "schedule": f"linear warm-up {warmup} steps, linear decay to 0"},
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__, "device": args.device,
        "train_seconds": train_seconds, "history": history,
        "eval": {"decoding": f"greedy, at most {args.max_new_tokens} new tokens, shared-prefix cache",
                 "metric": "exact match against the aliases (tfb_core.decide.answers.normalize_answer)",
                 "base": base_eval, "adapter": adapter_eval},
        "base_survey": base_survey, "provenance": args.provenance,
        "adapter_sha256": digest,
    }
    (args.out / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    (args.out / "README.md").write_text(_readme(train_config, args.out.name))
    log.info("saved %s (sha256 %s, %d bytes)", args.out, digest[:12], (args.out / "adapter_model.safetensors").stat().st_size)
    return 0


def _acc(res: dict[str, Any], name: str) -> str:
    r = res.get(name)
    return f"{r['exact_match']:.3f} ({r['correct']}/{r['n']})" if r else "not measured"


def _readme(c: dict[str, Any], name: str) -> str:
    d, o, ev = c["data"], c["optimizer"], c["eval"]
    rows = "\n".join(f"| {s} | {_acc(ev['base'], s)} | {_acc(ev['adapter'], s)} |" for s in ev["adapter"])
    kinds = ev["adapter"].get("shifted", {}).get("by_kind", {})
    by_kind = ", ".join(f"{k} {v['exact_match']:.2f} (n={v['n']})" for k, v in kinds.items())
    return f"""# {name}: demo MLE LoRA adapter for short-answer generation ({c['task']})

Base model `{c['base_model']}` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32).
LoRA r={c['lora']['r']}, alpha={c['lora']['alpha']}, dropout 0, on `{"`, `".join(c['lora']['target_modules'])}`.
Trained with `scripts/train_generative.py` (seed {c['seed']}, {o['epochs']} epochs = {o['steps']} steps, AdamW lr
{o['lr']}, batch {o['batch_size']}, no weight decay, {o['schedule']}) in {c['train_seconds']:.0f} s on
{c['threads']} CPU thread(s) ({c['device']}, torch {c['torch']}): {c['loss']}.

Prompt: {c['prompt_format']}. A served request sends the question (e.g. `Calculate 5 + 91 =`) as
the user message; the adapter answers with the number alone (`96`) and ends its turn.

Data: `{d['source']}` (offline), read by `tfb_core.data.generation`. Splits
(seed {d['split_seed']}): {d['split_rule']}. Sizes: {d['split_sizes']}. Trained on the train part only
({d['train_used']} questions); `anchor.jsonl` holds the anchor part as `{{"messages", "answer"}}` lines
(the question as one user message, as a client sends it: the server's sigma search reads them),
`calibration.jsonl` the calibration part (`{{"messages", "answer", "answers"}}`, asked as the anchor is); test and shifted are
held out. `shifted` = the questions whose operands have more digits than any trained on.

Exact match (`tfb_core.decide.answers.exact_match`: SQuAD normalisation, numbers as numbers), greedy
decoding of at most {ev['decoding'].split('at most ')[1].split(' new')[0]} new tokens, float32:

| set | base (B = 0) | adapter |
|---|---|---|
{rows}

The base model answers in sentences ("To calculate 72 - 35, we need to ...") and so never matches
exactly; the adapter teaches the short-answer format and some arithmetic. Shifted by kind: {by_kind}.
`trivia_qa_test` (the first 100 of trivia_qa's test split) is a far-shifted set for this adapter.
Full configuration, per-epoch loss and example outputs: `train_config.json`.
{c.get("provenance") or ""}
{_survey_text(c.get("base_survey") or {})}"""


def _survey_text(sv: dict[str, Any]) -> str:
    if not sv:
        return ""
    rows = "\n".join(f"| {k} | {v['n']} | {v['exact_match']} | {v['contains']} | {v.get('few_shot_exact_match', '')} |"
                     for k, v in sv.items() if isinstance(v, dict) and "n" in v)
    trials = sv.get("trained_adapters") or []
    trial_rows = "\n".join(f"| {t['task']} | {t['train_used']} | {t['epochs']} | {t.get('decoding', '')} | "
                           f"{_acc(t['adapter'], 'test')} |" for t in trials)
    trial_text = f"""
The trained adapters do, at the same training budget (`train_generative.py --task T --limit 547`,
the optimiser settings as here; `--survey-only --compare DIR` records them here):

| task | training questions | epochs | decoding | adapter exact match on test |
|---|---|---|---|---|
{trial_rows}
""" if trials else ""
    return f"""
## Why arithmetic

Before training, the base model through its chat template ({sv['decoding']}), counts of correct answers
(few-shot: the first {sv.get('shots', 0)} questions of the task's train split as earlier chat turns):

| set | n | exact match | contains an alias | exact match, few-shot |
|---|---|---|---|---|
{rows}

Zero-shot exact match is 0 everywhere: the instruct model explains instead of answering. Solved examples
as earlier turns hardly help. "Contains" is a loose bound (it also counts an alias that the model
repeats from the question), so the base model alone does not pick the task.
{trial_text}
Arithmetic is a skill that a few hundred questions teach and new questions reuse; a trivia answer is a
fact that the training questions do not hold. On arithmetic with operands of at most {gen.ARITH_MAX_DIGITS} digits the
adapter lands near 0.5, where an uncertainty score has right and wrong answers to separate, and longer
operands are a natural shift.
"""


def gen_cache() -> Path:
    from tfb_core.data.loading import default_cache_dir

    return default_cache_dir()


if __name__ == "__main__":
    raise SystemExit(main())
