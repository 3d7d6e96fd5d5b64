"""The embedded default model, end to end: load SmolLM2-135M-Instruct from its GGUF, render a
chat prompt, and sample answers with the jitted sampler.

    python -m igpo_jax.demo [--question "..."] [--max_new_tokens 64]

Expect a short answer per question within about a minute on 2 CPU cores (mostly compilation).
"""

from __future__ import annotations

import argparse
import time

from igpo_jax.model.embedded import smollm2_gguf_path
from igpo_jax.model.tokenizer import load_tokenizer, stop_token_ids
from igpo_jax.model.weights import load_gguf
from igpo_jax.rollout.sampler import Sampler, SamplingParams

QUESTIONS = ("What is the capital of France?", "Name a mammal that can fly.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", help="question to ask (repeatable)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    questions = args.question or list(QUESTIONS)

    start = time.perf_counter()
    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    model = load_gguf(path)
    print(f"loaded {path} ({model.cfg.num_layers} layers) in {time.perf_counter() - start:.1f}s")

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True)["input_ids"] for q in questions]
    sampler = Sampler(model, tokenizer, batch_size=len(prompts),
                      cache_size=max(map(len, prompts)) + args.max_new_tokens + 16,
                      params=SamplingParams(temperature=0.0), stop_token_ids=stop_token_ids(tokenizer))
    start = time.perf_counter()
    outputs = sampler.generate(prompts, seeds=list(range(len(prompts))), max_new_tokens=args.max_new_tokens)
    print(f"sampled {sum(len(o.tokens) for o in outputs)} tokens in {time.perf_counter() - start:.1f}s")
    for question, out in zip(questions, outputs):
        answer = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        print(f"\nQ: {question}\nA: {answer}  [{out.finish_reason}, {len(out.tokens)} tokens]")


if __name__ == "__main__":
    main()
