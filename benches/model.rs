//! The local model's speed: prefill time for a 93-token chat prompt and
//! greedy decode tokens/s, best of 3, with the process RSS; side by side
//! with llama.cpp on the same GGUF and prompt when `LLAMA_CPP_PYTHON` names
//! a Python that has llama-cpp-python. `cargo bench --bench model`.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

use std::process::Command;
use std::time::Instant;

use clap::Parser as _;
use sluicegate::backend::ChatMessage;
use sluicegate::config::Config;
use sluicegate::model::tokenizer;

const DECODE_STEPS: usize = 128;

/// Peak RSS of this process (VmHWM), comparable with llama.cpp's figure.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("VmRSS")
        / 1024.0
}

fn main() {
    let path = Config::try_parse_from(["sluicegate"])
        .expect("defaults")
        .model_path();
    let loaded = Instant::now();
    let model = sluicegate::model::load(&path, None).expect("model (run scripts/fetch-model)");
    let load_s = loaded.elapsed().as_secs_f64();
    let messages = [
        ChatMessage::new(
            "system",
            "You are a helpful assistant. Answer in plain English, briefly and accurately, and say so when you do not know.",
        ),
        ChatMessage::new(
            "user",
            "I am planning a weekend trip to Paris with two children aged seven and ten. We like museums, parks and good food, but we do not like long queues. Which three places should we visit first, and why?",
        ),
    ];
    let prompt = model.template.render(&messages, true).expect("template");
    let ids = tokenizer::encode(&model.tokenizer, &prompt).expect("tokens");

    let mut best_prefill = f64::MAX;
    let mut best_decode = 0.0f64;
    for _ in 0..3 {
        let mut cache = model.weights.new_cache();
        let started = Instant::now();
        let mut logits = model.weights.forward(&ids, &mut cache).expect("prefill");
        best_prefill = best_prefill.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        for _ in 0..DECODE_STEPS {
            let next = argmax(&logits);
            logits = model.weights.forward(&[next], &mut cache).expect("decode");
        }
        best_decode = best_decode.max(DECODE_STEPS as f64 / started.elapsed().as_secs_f64());
    }
    let rss = rss_mib();
    println!(
        "sluicegate: load {load_s:.2} s; prompt {} tokens: prefill {:.0} ms, greedy decode {best_decode:.1} tokens/s ({DECODE_STEPS} steps, best of 3); peak RSS {rss:.0} MiB",
        ids.len(),
        best_prefill * 1e3,
    );

    let Ok(python) = std::env::var("LLAMA_CPP_PYTHON") else {
        println!(
            "llama.cpp: set LLAMA_CPP_PYTHON to a Python with llama-cpp-python to compare side by side"
        );
        return;
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/llama_cpp_reference.py"
        ))
        .arg(&path)
        .arg(threads.to_string())
        .arg(&prompt)
        .arg(DECODE_STEPS.to_string())
        .output()
        .expect("run llama.cpp reference");
    let line = String::from_utf8_lossy(&output.stdout);
    let Ok(reference) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
        println!(
            "llama.cpp: failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    };
    let prefill = reference["prefill_ms"].as_f64().unwrap_or(f64::NAN);
    let decode = reference["decode_tok_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "llama.cpp ({threads} threads): prompt {} tokens: prefill {prefill:.0} ms, greedy decode {decode:.1} tokens/s; peak RSS {:.0} MiB",
        reference["prompt_tokens"],
        reference["max_rss_mib"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "ratio: decode {:.2}x llama.cpp, prefill time {:.2}x llama.cpp",
        best_decode / decode,
        best_prefill * 1e3 / prefill
    );
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (id, &l) in (0u32..).zip(logits) {
        if l > best.1 {
            best = (id, l);
        }
    }
    best.0
}
