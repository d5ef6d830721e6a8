"""Score SmolLM2-135M-Instruct on the person_json test set, before or after fine-tuning.

A measurement tool until `sftlab eval` exists: greedy answers to the first --n test samples
(user turn = instruction + "\\n" + input, as alpaca rows are rendered for training), scored by
scripts/score_person_json.py. With --adapter, the LoRA adapter and the tokenizer/chat template
saved next to it are used, i.e. exactly what training used.
Usage: python scripts/eval_person_json.py [--adapter saves/quickstart] [--n 100] [--show 3]
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from score_person_json import score, summarize
from sftlab.model.assets import resolve_model

TEST_FILE = Path(__file__).resolve().parent.parent / "examples" / "data" / "person_json_test.json"


def load(adapter: str | None):
    base = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(adapter or base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return tokenizer, model.eval()


@torch.no_grad()
def generate(tokenizer, model, samples, max_new_tokens=48):
    """Greedy answers to a batch of alpaca samples (left-padded), special tokens dropped."""
    convs = [[{"role": "user", "content": s["instruction"] + "\n" + s["input"]}] for s in samples]
    batch = tokenizer.apply_chat_template(convs, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True, padding=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="output_dir of a LoRA run (default: the untuned model)")
    parser.add_argument("--n", type=int, default=100, help="score the first N test samples")
    parser.add_argument("--show", type=int, default=0, help="print the first K predictions")
    args = parser.parse_args()

    samples = json.loads(TEST_FILE.read_text(encoding="utf-8"))[: args.n]
    tokenizer, model = load(args.adapter)
    predictions = [p for i in range(0, len(samples), 16) for p in generate(tokenizer, model, samples[i : i + 16])]
    for sample, prediction in list(zip(samples, predictions))[: args.show]:
        print(f"--- {sample['input']}\npred: {prediction!r}\nref:  {sample['output']}")
    print(json.dumps(summarize([score(p, s["output"]) for p, s in zip(predictions, samples)])))


if __name__ == "__main__":
    main()
