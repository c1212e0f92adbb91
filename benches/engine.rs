//! Issue 12's anchor: the local engine side by side with llama.cpp's
//! `llama-server` on the same GGUF, through one streaming client, each
//! figure printed with the ratio and the goal. Nothing is asserted.
//!
//! `LLAMA_SERVER=/path/to/llama-server cargo bench --bench engine [-- single prefill batch turn long]`
//! (without `LLAMA_SERVER`, sluicegate alone; never in CI). llama-server
//! runs with 2 threads, the machine's cores, or `LLAMA_SERVER_THREADS`:
//! its threads spin at each step's barrier, so on a machine whose cores
//! are busy with other work 2 threads can run 10x slower than 1. The load
//! average is printed before and after for that reason.
//!
//! - single: one stream, 128 greedy tokens after a ~45-token prompt:
//!   decode tokens/s, token gap p50, TTFT;
//! - prefill: TTFT with `max_tokens: 1` for ~500- and ~2,000-token prompts;
//! - batch: 8 concurrent streams: aggregate tokens/s, gap p50, TTFT p50;
//! - turn: a conversation's second turn, and the same prompt cold;
//! - long: a ~1,500-token prompt arriving while 4 streams decode: their
//!   longest gap during its prefill against their median gap;
//! - then each server's peak RSS over the scenarios run.
//!
//! Both servers get the same request bodies and stay up side by side,
//! idle while the other is measured. Every prompt starts with a word drawn
//! at random, so that no prompt cache holds more than the chat template's
//! first tokens, except where the turn scenario wants it to.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

mod support;
#[path = "engine/target.rs"]
mod target;

use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::{Value, json};
use target::{Streamed, Target};

/// Runs of a single-stream figure; the median is reported.
const RUNS: usize = 3;

/// Filler for prompts: common words, about one token each.
const WORDS: &[&str] = &[
    "the", "river", "town", "market", "morning", "bread", "window", "garden", "old", "green",
    "quiet", "road", "bridge", "winter", "summer", "light", "house", "stone", "water", "field",
    "people", "walk", "small", "long", "evening", "school", "letter", "friend", "table", "door",
    "night", "city", "train", "music", "story", "book", "paper", "coffee", "rain", "hill", "tree",
    "bird", "boat", "harbour", "street", "lamp", "clock", "year", "day", "work",
];

const QUESTION: &str = "Describe a walk through an old town on a rainy day, in a few paragraphs.";
const SUMMARISE: &str = "Summarise the notes above in one sentence.";

fn word() -> &'static str {
    WORDS[rand::rng().random_range(0..WORDS.len())]
}

/// About `tokens` tokens of notes in sentences of 12 words, starting with
/// a random word.
fn notes(tokens: usize) -> String {
    let words = tokens * 12 / 13;
    let mut text = word().to_owned();
    for i in 1..words.max(1) {
        text.push_str(if i % 12 == 0 { ". " } else { " " });
        text.push_str(word());
    }
    text
}

/// The system message carries the notes (so the random word comes right
/// after the template's first tokens), the user message the question.
fn chat(notes_tokens: usize, question: &str) -> Vec<Value> {
    vec![
        json!({"role": "system", "content": format!("{}. You are a helpful assistant.", notes(notes_tokens))}),
        json!({"role": "user", "content": question}),
    ]
}

/// The body both servers get: greedy, streamed, with usage. No `model`:
/// each server picks its only one.
fn body(messages: &[Value], max_tokens: u32) -> Value {
    json!({
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn prompt_tokens(s: &Streamed) -> f64 {
    s.prompt_tokens.map_or(f64::NAN, |n| n as f64)
}

/// single: after one warm-up, `RUNS` streams of 128 greedy tokens.
/// Figures: decode tokens/s, gap p50 ms, TTFT ms, tokens, prompt tokens.
async fn single(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    target
        .stream(client, &body(&chat(14, QUESTION), 16), None)
        .await;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(
            target
                .stream(client, &body(&chat(14, QUESTION), 128), None)
                .await,
        );
    }
    let gap_p50 = |s: &Streamed| median(s.gaps().map(|(_, g)| ms(g)).collect());
    vec![
        median(runs.iter().map(Streamed::decode_rate).collect()),
        median(runs.iter().map(gap_p50).collect()),
        median(runs.iter().map(|s| ms(s.ttft())).collect()),
        median(runs.iter().map(|s| s.tokens() as f64).collect()),
        median(runs.iter().map(prompt_tokens).collect()),
    ]
}

/// prefill: TTFT with `max_tokens: 1`, median of `RUNS`, at ~500 and
/// ~2,000 tokens. Figures: for each, TTFT ms and prompt tokens.
async fn prefill(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let mut figures = Vec::new();
    for tokens in [500, 2000] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(
                target
                    .stream(client, &body(&chat(tokens - 25, SUMMARISE), 1), None)
                    .await,
            );
        }
        figures.push(median(runs.iter().map(|s| ms(s.ttft())).collect()));
        figures.push(median(runs.iter().map(prompt_tokens).collect()));
    }
    figures
}

/// batch: `SLOTS` streams of 128 tokens at once. Figures: aggregate
/// tokens/s (all tokens over the wall time from the first send to the
/// last end), gap p50 ms over all streams, TTFT p50 ms.
async fn batch(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let bodies: Vec<Value> = (0..target::SLOTS)
        .map(|_| body(&chat(14, QUESTION), 128))
        .collect();
    let started = Instant::now();
    let runs =
        futures_util::future::join_all(bodies.iter().map(|b| target.stream(client, b, None))).await;
    let wall = runs.iter().map(|s| s.ended).max().expect("streams") - started;
    let tokens: usize = runs.iter().map(Streamed::tokens).sum();
    vec![
        tokens as f64 / wall.as_secs_f64(),
        median(
            runs.iter()
                .flat_map(|s| s.gaps().map(|(_, g)| ms(g)))
                .collect(),
        ),
        median(runs.iter().map(|s| ms(s.ttft())).collect()),
    ]
}

/// turn: turn 1 (~45 tokens, a 128-token answer), then turn 2 = turn 1,
/// the answer and a new question in the same session; then the same
/// turn-2 prompt cold (another first word: same length, nothing cached).
/// Figures: turn-2 TTFT ms, cold TTFT ms, turn-2 prompt tokens.
async fn turn(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let session = format!("turn-{}", rand::rng().random_range(0..u32::MAX));
    let mut messages = chat(14, QUESTION);
    let first = target
        .stream(client, &body(&messages, 128), Some(&session))
        .await;
    messages.push(json!({"role": "assistant", "content": first.text}));
    messages.push(json!({"role": "user", "content": "Now tell the same walk in two sentences."}));
    let second = target
        .stream(client, &body(&messages, 16), Some(&session))
        .await;
    let system = messages[0]["content"].as_str().expect("system").to_owned();
    let (old_first, rest) = system.split_once(' ').expect("words");
    let other = WORDS
        .iter()
        .find(|w| **w != old_first)
        .expect("another word");
    messages[0]["content"] = json!(format!("{other} {rest}"));
    let cold = target.stream(client, &body(&messages, 16), None).await;
    vec![ms(second.ttft()), ms(cold.ttft()), prompt_tokens(&second)]
}

/// long: 4 streams of 256 tokens; after 1 s a ~1,500-token prompt. Figures:
/// the 4 streams' longest gap that overlaps the long prompt's time to
/// first token (ms), their median gap (ms), the ratio, the long TTFT (ms).
async fn long(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let bodies: Vec<Value> = (0..4).map(|_| body(&chat(14, QUESTION), 256)).collect();
    let streams =
        futures_util::future::join_all(bodies.iter().map(|b| target.stream(client, b, None)));
    let long_body = body(&chat(1500 - 25, SUMMARISE), 1);
    let arriving = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        target.stream(client, &long_body, None).await
    };
    let (streams, long) = tokio::join!(streams, arriving);
    let (from, to) = (long.sent, long.sent + long.ttft());
    let during = streams
        .iter()
        .flat_map(Streamed::gaps)
        .filter(|&(end, gap)| end > from && end - gap < to)
        .map(|(_, gap)| ms(gap))
        .fold(f64::NAN, f64::max);
    let typical = median(
        streams
            .iter()
            .flat_map(|s| s.gaps().map(|(_, g)| ms(g)))
            .collect(),
    );
    vec![during, typical, during / typical, ms(long.ttft())]
}

/// deep: 128 greedy tokens after a ~1,500-token prompt, median of
/// `RUNS` (each prompt new: another first word). Figures: decode tokens/s
/// after the first token, gap p50 ms, prompt tokens.
async fn deep(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let mut runs = Vec::new();
    for run in 0..RUNS {
        let mut messages = chat(1500 - 25, SUMMARISE);
        let system = messages[0]["content"].as_str().expect("system").to_owned();
        messages[0]["content"] = json!(format!("{} {system}", WORDS[run % WORDS.len()]));
        runs.push(target.stream(client, &body(&messages, 128), None).await);
    }
    let gap_p50 = |s: &Streamed| median(s.gaps().map(|(_, g)| ms(g)).collect());
    vec![
        median(runs.iter().map(Streamed::decode_rate).collect()),
        median(runs.iter().map(gap_p50).collect()),
        median(runs.iter().map(prompt_tokens).collect()),
    ]
}

/// The JSON schema of the `grammar` scenario: a list of cities.
fn cities_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "cities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "country": {"type": "string"},
                        "population": {"type": "integer"}
                    },
                    "required": ["city", "country", "population"]
                }
            }
        },
        "required": ["cities"]
    })
}

/// grammar: free against constrained decoding (the schema above through
/// `response_format`), 128 greedy tokens of the same question, one stream
/// (median of `RUNS`) and `SLOTS` at once. Figures: free tok/s,
/// constrained tok/s, how much slower constrained is (%); the same for the
/// streams' aggregate.
async fn grammar(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    const CITIES: &str = "List ten large cities with their country and population, as JSON.";
    let free = body(&chat(14, CITIES), 128);
    let mut constrained = free.clone();
    constrained["response_format"] = json!({
        "type": "json_schema",
        "json_schema": {"name": "cities", "schema": cities_schema()},
    });
    target.stream(client, &constrained, None).await;
    let mut figures = Vec::new();
    let mut one = Vec::new();
    for body in [&free, &constrained] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(target.stream(client, body, None).await.decode_rate());
        }
        one.push(median(runs));
    }
    figures.extend([one[0], one[1], (1.0 - one[1] / one[0]) * 100.0]);
    let mut many = Vec::new();
    for body in [&free, &constrained] {
        let started = Instant::now();
        let runs = futures_util::future::join_all(
            (0..target::SLOTS).map(|_| target.stream(client, body, None)),
        )
        .await;
        let wall = runs.iter().map(|s| s.ended).max().expect("streams") - started;
        let tokens: usize = runs.iter().map(Streamed::tokens).sum();
        many.push(tokens as f64 / wall.as_secs_f64());
    }
    figures.extend([many[0], many[1], (1.0 - many[1] / many[0]) * 100.0]);
    figures
}

/// quote: answers that repeat text, where prompt lookup pays: ~250
/// tokens of notes to repeat word for word, the same notes to repeat with
/// one word replaced (an edit of a given text), and a JSON array of
/// records whose keys repeat (a schema's), 200 greedy tokens each, median
/// of `RUNS`. Figures: the first's decode tok/s and gap p50 ms, then the
/// others' decode tok/s.
async fn quote(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let system = json!({"role": "system", "content": "You are a helpful assistant."});
    let asking = |ask: String| vec![system.clone(), json!({"role": "user", "content": ask})];
    let text = notes(250);
    let repeat = body(
        &asking(format!(
            "Repeat this text exactly, word for word:\n\n{text}"
        )),
        200,
    );
    let edit = body(
        &asking(format!(
            "Repeat this text with every \"river\" replaced by \"canal\":\n\n{}",
            notes(250)
        )),
        200,
    );
    let people: Vec<String> = (0..20).map(|i| format!("{} {}", word(), i)).collect();
    let mut records = body(
        &asking(format!(
            "List these people as JSON records with their name and town: {}",
            people.join(", ")
        )),
        200,
    );
    let record = json!({"type": "object", "properties": {"name": {"type": "string"},
        "town": {"type": "string"}}, "required": ["name", "town"]});
    records["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "people",
        "schema": {"type": "array", "items": record}}});
    let mut figures = Vec::new();
    for (i, body) in [repeat, edit, records].iter().enumerate() {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(target.stream(client, body, None).await);
        }
        figures.push(median(runs.iter().map(Streamed::decode_rate).collect()));
        if i == 0 {
            let gap_p50 = |s: &Streamed| median(s.gaps().map(|(_, g)| ms(g)).collect());
            figures.push(median(runs.iter().map(gap_p50).collect()));
        }
    }
    figures
}

/// choices: four sampled answers of up to 64 tokens to a ~500-token
/// prompt, as one request with `n` 4 (the prompt computed once, its
/// blocks shared) and as four requests at once (each its own notes, so
/// no cache helps), median of `RUNS`. Figures: wall ms each way, and the
/// completion tokens/s of each. A server without `n` gets NaN.
async fn choices(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let url = format!("{}/v1/chat/completions", target.base);
    let ask = |n: u32| {
        json!({"messages": chat(500, QUESTION), "temperature": 0.8, "seed": 1,
            "max_tokens": 64, "n": n})
    };
    // Wall ms and completion tokens of requests sent at once.
    let run = |bodies: Vec<Value>| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            let answers = futures_util::future::join_all(
                bodies.iter().map(|b| client.post(&url).json(b).send()),
            )
            .await;
            let mut tokens = 0.0;
            for answer in answers {
                let Ok(answer) = answer.and_then(reqwest::Response::error_for_status) else {
                    return (f64::NAN, f64::NAN);
                };
                let answer: Value = answer.json().await.unwrap_or_default();
                tokens += answer["usage"]["completion_tokens"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
            }
            (ms(started.elapsed()), tokens)
        }
    };
    let (mut shared, mut apart) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        shared.push(run(vec![ask(4)]).await);
        apart.push(run((0..4).map(|_| ask(1)).collect()).await);
    }
    let wall = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.0).collect());
    let rate = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.1 / r.0 * 1e3).collect());
    vec![wall(&shared), wall(&apart), rate(&shared), rate(&apart)]
}

/// Bytes per second two threads read from a 256 MiB buffer (best of
/// three): the ceiling that decoding, which reads every weight once a
/// token, runs against.
fn read_bandwidth() -> f64 {
    let words = 32 << 20;
    let buf: Vec<u64> = (0..words as u64).collect();
    let best = (0..3)
        .map(|_| {
            let started = Instant::now();
            std::thread::scope(|s| {
                for half in buf.chunks(words / 2) {
                    s.spawn(move || {
                        std::hint::black_box(half.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                    });
                }
            });
            started.elapsed()
        })
        .min()
        .expect("runs");
    (words * 8) as f64 / best.as_secs_f64()
}

/// bandwidth: this machine's memory read rate, the model file's bytes
/// (what one decode step reads: every weight, the tied output head
/// included), the tokens/s that rate allows, and one stream's decode
/// beside it. Figures: GB/s, MB, limit tok/s, decode tok/s, % of limit.
async fn bandwidth(target: &Target, client: &reqwest::Client) -> Vec<f64> {
    let rate = tokio::task::spawn_blocking(read_bandwidth)
        .await
        .expect("measured");
    let model = <sluicegate::config::Config as clap::Parser>::try_parse_from(["sluicegate"])
        .expect("defaults")
        .model_path();
    let bytes = std::fs::metadata(&model).expect("the model file").len() as f64;
    let limit = rate / bytes;
    let run = target
        .stream(client, &body(&chat(14, QUESTION), 128), None)
        .await;
    let decode = run.decode_rate();
    vec![
        rate / 1e9,
        bytes / 1e6,
        limit,
        decode,
        decode / limit * 100.0,
    ]
}

#[derive(Clone, Copy)]
enum Scenario {
    Single,
    Prefill,
    Batch,
    Turn,
    Long,
    Deep,
    Grammar,
    Quote,
    Choices,
    Bandwidth,
}

impl Scenario {
    const ALL: [Self; 10] = [
        Self::Single,
        Self::Prefill,
        Self::Batch,
        Self::Turn,
        Self::Long,
        Self::Deep,
        Self::Grammar,
        Self::Quote,
        Self::Choices,
        Self::Bandwidth,
    ];

    /// What the command line names it by.
    fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Prefill => "prefill",
            Self::Batch => "batch",
            Self::Turn => "turn",
            Self::Long => "long",
            Self::Deep => "deep",
            Self::Grammar => "grammar",
            Self::Quote => "quote",
            Self::Choices => "choices",
            Self::Bandwidth => "bandwidth",
        }
    }

    /// Label, unit and goal of each figure that `measure` returns.
    fn rows(self) -> &'static [(&'static str, &'static str, Goal)] {
        match self {
            Self::Single => SINGLE,
            Self::Prefill => PREFILL,
            Self::Batch => BATCH,
            Self::Turn => TURN,
            Self::Long => LONG,
            Self::Deep => DEEP,
            Self::Grammar => GRAMMAR,
            Self::Quote => QUOTE,
            Self::Choices => CHOICES,
            Self::Bandwidth => BANDWIDTH,
        }
    }

    async fn measure(self, target: &Target, client: &reqwest::Client) -> Vec<f64> {
        match self {
            Self::Single => single(target, client).await,
            Self::Prefill => prefill(target, client).await,
            Self::Batch => batch(target, client).await,
            Self::Turn => turn(target, client).await,
            Self::Long => long(target, client).await,
            Self::Deep => deep(target, client).await,
            Self::Grammar => grammar(target, client).await,
            Self::Quote => quote(target, client).await,
            Self::Choices => choices(target, client).await,
            Self::Bandwidth => bandwidth(target, client).await,
        }
    }
}

/// Which way a figure should go, for the goal column.
#[derive(Clone, Copy)]
enum Goal {
    /// sluicegate / llama-server at least this.
    AtLeast(f64),
    /// sluicegate / llama-server at most this.
    AtMost(f64),
    /// sluicegate's own figure below this.
    Below(f64),
    None,
}

/// A scenario's rows: label, unit and goal for each figure it returns.
const SINGLE: &[(&str, &str, Goal)] = &[
    ("single: decode", "tok/s", Goal::AtLeast(1.2)),
    ("single: token gap p50", "ms", Goal::None),
    ("single: TTFT", "ms", Goal::None),
    ("single: tokens streamed", "n", Goal::None),
    ("single: prompt", "tokens", Goal::None),
];
const PREFILL: &[(&str, &str, Goal)] = &[
    ("prefill ~500: TTFT, max_tokens 1", "ms", Goal::AtMost(0.8)),
    ("prefill ~500: prompt", "tokens", Goal::None),
    ("prefill ~2000: TTFT, max_tokens 1", "ms", Goal::AtMost(0.8)),
    ("prefill ~2000: prompt", "tokens", Goal::None),
];
const BATCH: &[(&str, &str, Goal)] = &[
    ("batch 8: aggregate", "tok/s", Goal::AtLeast(1.5)),
    ("batch 8: token gap p50", "ms", Goal::None),
    ("batch 8: TTFT p50", "ms", Goal::AtMost(1.0)),
];
const TURN: &[(&str, &str, Goal)] = &[
    ("turn 2: TTFT, same session", "ms", Goal::AtMost(1.0)),
    ("turn 2: TTFT, same prompt cold", "ms", Goal::None),
    ("turn 2: prompt", "tokens", Goal::None),
];
const LONG: &[(&str, &str, Goal)] = &[
    ("long: longest gap during its prefill", "ms", Goal::None),
    ("long: median gap", "ms", Goal::None),
    ("long: longest / median", "x", Goal::Below(5.0)),
    ("long: the ~1500-token prompt's TTFT", "ms", Goal::None),
];

const DEEP: &[(&str, &str, Goal)] = &[
    (
        "deep: decode after ~1500 tokens",
        "tok/s",
        Goal::AtLeast(1.2),
    ),
    ("deep: token gap p50", "ms", Goal::None),
    ("deep: prompt", "tokens", Goal::None),
];

const GRAMMAR: &[(&str, &str, Goal)] = &[
    ("grammar, 1 stream: free", "tok/s", Goal::None),
    ("grammar, 1 stream: JSON schema", "tok/s", Goal::None),
    (
        "grammar, 1 stream: schema slower by",
        "%",
        Goal::Below(10.0),
    ),
    ("grammar, 8 streams: free aggregate", "tok/s", Goal::None),
    (
        "grammar, 8 streams: JSON schema aggregate",
        "tok/s",
        Goal::None,
    ),
    (
        "grammar, 8 streams: schema slower by",
        "%",
        Goal::Below(10.0),
    ),
];

const QUOTE: &[(&str, &str, Goal)] = &[
    (
        "quote: decode, repeating ~250 tokens",
        "tok/s",
        Goal::AtLeast(1.5),
    ),
    ("quote: token gap p50", "ms", Goal::None),
    ("quote: decode, editing a given text", "tok/s", Goal::None),
    ("quote: decode, JSON that repeats keys", "tok/s", Goal::None),
];

const CHOICES: &[(&str, &str, Goal)] = &[
    (
        "choices: n 4 of a ~500-token prompt, wall",
        "ms",
        Goal::None,
    ),
    ("choices: 4 requests at once, wall", "ms", Goal::None),
    ("choices: n 4, completion", "tok/s", Goal::None),
    ("choices: 4 requests, completion", "tok/s", Goal::None),
];

const BANDWIDTH: &[(&str, &str, Goal)] = &[
    ("bandwidth: memory read, 2 threads", "GB/s", Goal::None),
    ("bandwidth: weights read per token", "MB", Goal::None),
    ("bandwidth: decode limit at that rate", "tok/s", Goal::None),
    (
        "bandwidth: one stream's decode",
        "tok/s",
        Goal::AtLeast(1.2),
    ),
    ("bandwidth: decode as share of the limit", "%", Goal::None),
];

fn print_row(label: &str, unit: &str, goal: Goal, ours: f64, theirs: Option<f64>) {
    let ratio = theirs.map(|t| ours / t);
    let (goal_text, met) = match goal {
        Goal::AtLeast(g) => (format!(">= {g}x"), ratio.map(|r| r >= g)),
        Goal::AtMost(g) => (format!("<= {g}x"), ratio.map(|r| r <= g)),
        Goal::Below(g) => (format!("< {g} own"), Some(ours < g)),
        Goal::None => (String::new(), None),
    };
    println!(
        "{:<46} {:>10.1} {:>12} {:>7} {:>9} {}",
        format!("{label} ({unit})"),
        ours,
        theirs.map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
        ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
        goal_text,
        match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        },
    );
}

#[tokio::main]
async fn main() {
    // reqwest is built without a bundled TLS provider.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    // `cargo bench` passes --bench; a filter picks scenarios by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));

    println!("load average before: {}", load_average());
    let ours = Target::sluicegate().await;
    let theirs = match std::env::var("LLAMA_SERVER") {
        Ok(binary) => {
            let model =
                <sluicegate::config::Config as clap::Parser>::try_parse_from(["sluicegate"])
                    .expect("defaults")
                    .model_path();
            let threads = std::env::var("LLAMA_SERVER_THREADS")
                .map_or(2, |t| t.parse().expect("LLAMA_SERVER_THREADS: a number"));
            println!("llama-server: {binary}, {threads} threads");
            Some(Target::llama_server(&binary, &model.to_string_lossy(), threads).await)
        }
        Err(_) => {
            println!("LLAMA_SERVER unset: sluicegate alone");
            None
        }
    };
    // A connection per request: llama-server's HTTP library closes a
    // kept-alive connection after a few requests, and a request sent on it
    // just then fails.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    println!(
        "{:<46} {:>10} {:>12} {:>7} {:>9}",
        "", "sluicegate", "llama-server", "ratio", "goal"
    );
    for scenario in Scenario::ALL {
        if !wanted(scenario.name()) {
            continue;
        }
        let mine = scenario.measure(&ours, &client).await;
        let other = match &theirs {
            Some(t) => Some(scenario.measure(t, &client).await),
            None => None,
        };
        for (i, &(label, unit, goal)) in scenario.rows().iter().enumerate() {
            print_row(label, unit, goal, mine[i], other.as_ref().map(|o| o[i]));
        }
    }
    print_row(
        "peak RSS over the scenarios run (VmHWM)",
        "MiB",
        Goal::AtMost(1.0),
        ours.peak_rss_mib(),
        theirs.as_ref().map(Target::peak_rss_mib),
    );
    println!("load average after: {}", load_average());
}

/// The 1-, 5- and 15-minute load averages: the machine is shared.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
