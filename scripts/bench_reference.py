#!/usr/bin/env python3
"""PyTorch + transformers + peft reference for `webpeft bench`.

Runs the same synthetic workload as `webpeft bench` (training steps of one PEFT
method: LoRA, prompt tuning or IA3; a full-logits forward pass; greedy generation
with a KV cache) on the CPU and prints one JSON object with the same keys as ours
on stdout; logs go to stderr.

    .venv/bin/python scripts/bench_reference.py --batch 4 --seq-len 128 --steps 3
    .venv/bin/python scripts/bench_reference.py --method ia3
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_MODEL = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--method", choices=["lora", "prompt-tuning", "ia3"], default="lora")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt tuning")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target", default=None, help="LoRA, IA3: comma-separated module names or all-linear (default: q_proj,v_proj for LoRA, peft's default for IA3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    a = p.parse_args()
    if a.batch < 1 or a.steps < 1 or a.seq_len < 2 or a.gen_tokens < 1:
        p.error("batch, steps, gen-tokens >= 1 and seq-len >= 2")
    return a


def main():
    a = parse_args()
    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)

    model_dir, gguf_file = os.path.split(os.path.abspath(a.model))
    log(f"loading {a.model} ({a.dtype}, {threads} threads)")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=dtype)
    log(f"loaded in {time.perf_counter() - t:.1f} s")
    # Unique parameters (tied embeddings counted once), like `Llama::num_parameters`.
    model_parameters = sum(p.numel() for p in model.parameters())

    target = a.target or ("q_proj,v_proj" if a.method == "lora" else None)
    if target is None or target == "all-linear":
        targets = target
        targets_json = target
    else:
        targets = [s.strip() for s in target.split(",") if s.strip()]
        targets_json = sorted(targets)
    if a.method == "lora":
        cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    elif a.method == "ia3":
        cfg = IA3Config(target_modules=targets, task_type="CAUSAL_LM")
    else:
        cfg = PromptTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_parameters = sum(p.numel() for p in trainable)
    log(f"training {trainable_parameters} {a.method} parameters ({model_parameters} base parameters frozen)")

    vocab = model.config.vocab_size
    rows = [[((b * 7919 + i * 104729) % (vocab - 10)) + 5 for i in range(a.seq_len)] for b in range(a.batch)]
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(ids)
    tokens = a.batch * a.seq_len

    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    model.train()
    t = time.perf_counter()
    loss = step()
    first_step_s = time.perf_counter() - t
    log(f"warm-up step: {first_step_s:.3f} s, loss {loss:.4f}")
    t = time.perf_counter()
    for i in range(a.steps):
        loss = step()
        log(f"step {i + 1}: loss {loss:.4f}")
    step_s = (time.perf_counter() - t) / a.steps

    # Forward only: full logits of every position, warm once, then timed.
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        t = time.perf_counter()
        for _ in range(a.steps):
            model(input_ids=ids, attention_mask=mask).logits
        fwd_s = (time.perf_counter() - t) / a.steps

        # Generation: 32-token prompt (row 0, cycled), greedy, KV cache.
        prompt = torch.tensor([[rows[0][i % a.seq_len] for i in range(32)]], dtype=torch.long)
        pad = model.config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        def generate():
            return model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=a.gen_tokens,
                min_new_tokens=a.gen_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad if pad is not None else 0,
            )

        # A first run, timed apart (as webpeft's bench, whose first run compiles kernels).
        t = time.perf_counter()
        generate()
        gen_first_s = time.perf_counter() - t
        t = time.perf_counter()
        out = generate()
        gen_s = time.perf_counter() - t
    generated = out.shape[1] - prompt.shape[1]

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform != "darwin":  # Linux reports KiB, macOS bytes
        rss *= 1024

    report = {
        "device": f"cpu (PyTorch {torch.__version__}, {threads} threads)",
        "reference": "pytorch+transformers+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "python": sys.version.split()[0]},
        "dtype": a.dtype,
        "model_parameters": model_parameters,
        "method": a.method,
        "r": a.r if a.method == "lora" else None,
        "target_modules": targets_json,
        "num_virtual_tokens": a.num_virtual_tokens if a.method == "prompt-tuning" else None,
        "trainable_parameters": trainable_parameters,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "first_step_s": first_step_s,
        "train_ms_per_step": step_s * 1e3,
        "train_tokens_per_s": tokens / step_s,
        "forward_tokens_per_s": tokens / fwd_s,
        "generate_tokens_per_s": generated / gen_s,
        "generate_first_s": gen_first_s,
        "generated_tokens": generated,
        "final_loss": loss,
        "peak_memory_rss_bytes": rss,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
