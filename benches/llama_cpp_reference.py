"""llama.cpp on the same GGUF and prompt, for benches/model.rs to compare.

usage: llama_cpp_reference.py MODEL THREADS PROMPT_TEXT DECODE_STEPS
Prints one JSON line: prefill_ms, prompt_tokens, decode_tok_s, max_rss_mib.
Needs the llama-cpp-python package (it compiles llama.cpp from source).
"""
import json, sys, time

import numpy as np
from llama_cpp import Llama, llama_cpp

path, threads, prompt, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
best = None
for _ in range(3):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t0
    spent = 0.0
    for _ in range(steps):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        t1 = time.perf_counter()
        llm.eval([tok])
        spent += time.perf_counter() - t1
    run = {"prefill_ms": prefill * 1000, "prompt_tokens": len(tokens), "decode_tok_s": steps / spent}
    if best is None or run["decode_tok_s"] > best["decode_tok_s"]:
        best = run
# VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's.
with open("/proc/self/status") as status:
    hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
best["max_rss_mib"] = hwm_kib / 1024
print(json.dumps(best))
