//! `kiln serve` end to end: the binary on an ephemeral port against tiny models it trains itself
//! (`kiln demo --size tiny`), talked to over plain HTTP (ureq, and raw sockets where a client must
//! misbehave). Chat completions must equal `kiln chat`, whatever else shares the batch; bad input
//! gets OpenAI's error JSON with the right status while the server keeps serving; a client that
//! disconnects frees its slot; SIGTERM lets in-flight requests finish.

mod common;

use common::{s, text};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const THREADS: usize = 2;
const KEY: &str = "sk-test-secret";

/// The tiny demo models (trained once per test run) and a chat request that runs to its token
/// limit (found once), for the tests that need a request to stay in flight.
struct Models {
    root: PathBuf,
    long_request: Value,
}

impl Models {
    fn sft(&self) -> PathBuf {
        self.root.join("sft")
    }
    fn rm(&self) -> PathBuf {
        self.root.join("rm")
    }
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-tiny-demo");
        common::ok(
            THREADS,
            &["demo", "--size", "tiny", "--fresh", "--out", s(&root)],
        );
        let srv = Server::start(&root.join("sft"), &[]);
        let long_request = (0..200)
            .map(|seed| {
                json!({"model": "sft", "seed": seed, "temperature": 1.0, "max_tokens": 40,
                       "messages": [{"role": "user", "content": "Tell me a story."}]})
            })
            .find(|req| {
                let (st, r) = srv.post("/v1/chat/completions", &req.to_string());
                assert_eq!(st, 200, "{r}");
                r["choices"][0]["finish_reason"] == "length"
            })
            .expect("no seed in 0..200 makes the tiny model write 40 tokens");
        Models { root, long_request }
    })
}

/// `kiln serve --port 0` with its stderr collected; killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    agent: ureq::Agent,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = common::kiln(THREADS)
            .args(["serve", "--model", s(model), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kiln serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kiln serve did not print its address:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Server {
            child,
            base,
            log,
            agent,
        }
    }

    fn addr(&self) -> &str {
        self.base.strip_prefix("http://").unwrap()
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let auth = key.map(|k| format!("Bearer {k}"));
        let resp = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (_, b) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(b.unwrap_or(""))
            }
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (status, text)
    }

    /// POST with the test API key; the body parsed as JSON.
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (st, t) = self.request("POST", path, Some(body), Some(KEY));
        (st, parse(&t))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (st, t) = self.request("GET", path, None, Some(KEY));
        (st, parse(&t))
    }

    fn health(&self) -> Value {
        self.get("/health").1
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a line of stderr containing `needle`.
    fn wait_log(&self, needle: &str, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn wait_health(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let h = self.health();
            if ok(&h) {
                return h;
            }
            assert!(Instant::now() < end, "{what}: /health stayed {h}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(t: &str) -> Value {
    serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

fn chat_body(prompt: &str, seed: u64, temperature: f32, max_tokens: usize, extra: Value) -> String {
    let mut b = json!({
        "model": "sft",
        "messages": [{"role": "user", "content": prompt}],
        "seed": seed,
        "temperature": temperature,
        "max_tokens": max_tokens,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

/// What `kiln chat --prompt` prints as the answer.
fn kiln_chat(model: &Path, prompt: &str, seed: u64, temperature: f32, max_tokens: usize) -> String {
    let out = common::ok(
        THREADS,
        &[
            "chat",
            "--model",
            s(model),
            "--prompt",
            prompt,
            "--seed",
            &seed.to_string(),
            "--temperature",
            &temperature.to_string(),
            "--max-new-tokens",
            &max_tokens.to_string(),
        ],
    );
    let t = text(&out.stdout);
    t.strip_suffix('\n')
        .expect("kiln chat ends its answer with a newline")
        .to_string()
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// The text of each choice, and each choice's finish reason, from streamed chat chunks.
fn stream_text(events: &[String], n: usize) -> (Vec<String>, Vec<String>, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut texts = vec![String::new(); n];
    let mut finish = vec![String::new(); n];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v = parse(e);
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if let Some(t) = c["delta"]["content"].as_str() {
                texts[i].push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish[i] = f.to_string();
            }
        }
    }
    (texts, finish, usage)
}

#[test]
fn chat_completions_equal_kiln_chat_whatever_shares_the_batch() {
    let m = models();
    // 20 slots: a full batch decodes in two forward calls (16 + 4 rows).
    let srv = Server::start(&m.sft(), &["--max-batch", "20", "--api-key", KEY]);
    let prompt = "What is 2 plus 3?";
    let (seed, temp, max) = (7, 0.9, 30);
    let want = kiln_chat(&m.sft(), prompt, seed, temp, max);
    assert!(!want.is_empty());

    let (st, r) = srv.post(
        "/v1/chat/completions",
        &chat_body(prompt, seed, temp, max, json!({})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], want.as_str(), "{r}");
    let usage = &r["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3, "{r}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // Streamed: the same text, in OpenAI's chunks, with usage at the end.
    let (st, body) = srv.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            prompt,
            seed,
            temp,
            max,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        )),
        Some(KEY),
    );
    assert_eq!(st, 200, "{body}");
    let events = sse_data(&body);
    assert!(events.len() > 3, "{body}");
    let first = parse(&events[0]);
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{first}");
    let (texts, finish, usage) = stream_text(&events, 1);
    assert_eq!(texts[0], want);
    assert_eq!(
        finish[0],
        r["choices"][0]["finish_reason"].as_str().unwrap()
    );
    assert_eq!(usage.as_ref(), Some(&r["usage"]));

    // n = 2: seeds 7 and 8.
    let (st, r2) = srv.post(
        "/v1/chat/completions",
        &chat_body(prompt, seed, temp, max, json!({"n": 2})),
    );
    assert_eq!(st, 200, "{r2}");
    assert_eq!(r2["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(
        r2["choices"][1]["message"]["content"],
        kiln_chat(&m.sft(), prompt, seed + 1, temp, max).as_str()
    );

    // A stop sequence from inside the answer: the text ends just before it.
    // The last letter of a word, a space and the next letter: the stop string spans two tokens,
    // so the stream must hold back its start until it knows.
    let b = want.as_bytes();
    let at = (1..b.len().saturating_sub(2))
        .find(|&i| {
            b[i].is_ascii_alphanumeric() && b[i + 1] == b' ' && b[i + 2].is_ascii_alphanumeric()
        })
        .expect("two words in the answer");
    let stop = &want[at..at + 3];
    let cut = want.find(stop).unwrap();
    let (st, r3) = srv.post(
        "/v1/chat/completions",
        &chat_body(
            prompt,
            seed,
            temp,
            max,
            json!({"stop": [stop, "never-seen"]}),
        ),
    );
    assert_eq!(st, 200, "{r3}");
    assert_eq!(
        r3["choices"][0]["message"]["content"],
        &want[..cut],
        "stop {stop:?}"
    );
    assert_eq!(r3["choices"][0]["finish_reason"], "stop");
    // ... and streamed, where the held-back start of the stop string must not leak.
    let (_, body) = srv.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            prompt,
            seed,
            temp,
            max,
            json!({"stop": stop, "stream": true}),
        )),
        Some(KEY),
    );
    let (texts, finish, _) = stream_text(&sse_data(&body), 1);
    assert_eq!(
        (texts[0].as_str(), finish[0].as_str()),
        (&want[..cut], "stop")
    );

    // Completions continue a document as `kiln generate` does.
    let gen = text(
        &common::ok(
            THREADS,
            &[
                "generate",
                "--model",
                s(&m.sft()),
                "--prompt",
                "Mia",
                "--seed",
                "3",
                "--temperature",
                "0.8",
                "--max-new-tokens",
                "12",
            ],
        )
        .stdout,
    );
    let (st, c) = srv.post(
        "/v1/completions",
        &json!({"model": "sft", "prompt": "Mia", "seed": 3, "temperature": 0.8, "max_tokens": 12})
            .to_string(),
    );
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(
        format!("Mia{}\n", c["choices"][0]["text"].as_str().unwrap()),
        gen
    );

    // Twenty requests at once, different seeds and lengths: each answer is the answer it gets
    // alone.
    let reqs: Vec<String> = (0..20)
        .map(|i| {
            let p = [
                "What is 2 plus 3?",
                "Where does Mia live?",
                "Spell cat backwards.",
            ][i % 3];
            chat_body(p, 100 + i as u64, 1.0, 10 + i, json!({}))
        })
        .collect();
    let alone: Vec<Value> = reqs
        .iter()
        .map(|b| srv.post("/v1/chat/completions", b).1["choices"][0].clone())
        .collect();
    let srv = Arc::new(srv);
    let together: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = reqs
            .iter()
            .map(|b| {
                let srv = srv.clone();
                sc.spawn(move || srv.post("/v1/chat/completions", b))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (st, r) = h.join().unwrap();
                assert_eq!(st, 200, "{r}");
                r["choices"][0].clone()
            })
            .collect()
    });
    assert_eq!(alone, together);
    let h = srv.health();
    assert_eq!(
        (h["active"].as_u64(), h["queued"].as_u64()),
        (Some(0), Some(0)),
        "{h}"
    );
    // Every request has its access log line.
    assert!(
        srv.wait_log("\"POST /v1/completions\" 200", 5),
        "{}",
        srv.log_text()
    );
}

/// Sends a streaming request over a raw socket and reads until the first generated text.
fn start_stream(addr: &str, body: &str) -> TcpStream {
    let mut sock = TcpStream::connect(addr).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"")
        || String::from_utf8_lossy(&seen).matches("data: ").count() < 2
    {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    sock
}

fn assert_error(st: u16, r: &Value, want_status: u16, param: Option<&str>, needle: &str) {
    assert_eq!(st, want_status, "{r}");
    let e = &r["error"];
    assert!(
        e["message"].as_str().unwrap().contains(needle),
        "expected {needle:?} in {r}"
    );
    assert!(e["type"].is_string(), "{r}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{r}");
    }
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let m = models();
    let srv = Server::start(
        &m.sft(),
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-tokens",
            "64",
            "--api-key",
            KEY,
            "--step-delay-ms",
            "25",
        ],
    );
    let good = chat_body("What is 2 plus 3?", 1, 0.5, 3, json!({}));
    let serves = || {
        let (st, r) = srv.post("/v1/chat/completions", &good);
        assert_eq!(st, 200, "the server stopped serving good requests: {r}");
    };
    let chat = |body: &str| srv.post("/v1/chat/completions", body);
    let (st, t) = srv.request(
        "POST",
        "/v1/chat/completions",
        Some("{\"model\": \"sft\", "),
        Some(KEY),
    );
    assert_error(st, &parse(&t), 400, None, "could not parse the JSON body");
    serves();
    let (st, r) = chat("[1, 2]");
    assert_error(st, &r, 400, None, "must be a JSON object");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"temperature": "hot"})));
    assert_error(
        st,
        &r,
        400,
        Some("temperature"),
        "expected a number, but got a string",
    );
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"messages": "hi"})));
    assert_error(st, &r, 400, Some("messages"), "expected an array");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"stream": "yes"})));
    assert_error(st, &r, 400, Some("stream"), "expected a boolean");
    serves();
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"max_tokens": -5})));
    assert_error(
        st,
        &r,
        400,
        Some("max_tokens"),
        "less than the minimum of 1",
    );
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"max_tokens": 1000})));
    assert_error(st, &r, 400, Some("max_tokens"), "--max-tokens");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"temperature": 7})));
    assert_error(st, &r, 400, Some("temperature"), "outside [0, 2]");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"n": 2})));
    assert_error(st, &r, 400, Some("n"), "--max-batch");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"messages": []})));
    assert_error(st, &r, 400, Some("messages"), "empty array");
    let (st, r) = chat(&chat_body(
        "hi",
        1,
        0.5,
        3,
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    ));
    assert_error(st, &r, 400, Some("messages[0].role"), "wizard");
    serves();
    let long = "one two three four five six seven eight nine ten ".repeat(10);
    let (st, r) = chat(&chat_body(&long, 1, 0.5, 3, json!({})));
    assert_error(
        st,
        &r,
        400,
        Some("messages"),
        "maximum context length is 64 tokens",
    );
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    let (st, r) = chat(&chat_body("hi", 1, 0.5, 3, json!({"model": "gpt-4"})));
    assert_error(
        st,
        &r,
        404,
        Some("model"),
        "The model 'gpt-4' does not exist",
    );
    assert_eq!(r["error"]["code"], "model_not_found");
    let (st, r) = srv.post(
        "/v1/score",
        &json!({"model": "sft", "prompt": "a", "response": "b"}).to_string(),
    );
    assert_error(st, &r, 400, None, "not a reward model");
    let (st, r) = srv.post("/v1/nothing-here", "{}");
    assert_error(
        st,
        &r,
        404,
        None,
        "Unknown request URL: POST /v1/nothing-here",
    );
    serves();
    // The API key.
    let (st, t) = srv.request(
        "POST",
        "/v1/chat/completions",
        Some(&good),
        Some("sk-wrong"),
    );
    assert_error(st, &parse(&t), 401, None, "Incorrect API key");
    let (st, t) = srv.request("GET", "/v1/models", None, None);
    assert_error(st, &parse(&t), 401, None, "Authorization: Bearer");
    // The page and the health check need no key.
    let (st, page) = srv.request("GET", "/", None, None);
    assert_eq!(st, 200);
    assert!(
        page.contains("<html") && page.contains("/v1/chat/completions"),
        "{page}"
    );
    let (st, h) = srv.request("GET", "/health", None, None);
    assert_eq!((st, parse(&h)["status"].as_str()), (200, Some("ok")));
    let (st, models) = srv.get("/v1/models");
    assert_eq!(st, 200);
    assert_eq!(models["data"][0]["id"], "sft");
    assert_eq!(models["data"][0]["context_length"], 64);
    serves();

    // One slot, one place in the queue: A decodes, B waits, C is turned away with 429.
    let long_req = m.long_request.to_string();
    let mut a = json!(m.long_request);
    a["stream"] = json!(true);
    let sock = start_stream(srv.addr(), &a.to_string());
    srv.wait_health("A decoding", |h| h["active"] == 1);
    let b = {
        let srv = &srv;
        let good = good.clone();
        std::thread::scope(|sc| {
            let b = sc.spawn(move || srv.post("/v1/chat/completions", &good));
            srv.wait_health("B queued", |h| h["queued"] == 1);
            let (st, r) = srv.post("/v1/chat/completions", &long_req);
            assert_error(st, &r, 429, None, "busy");
            assert_eq!(r["error"]["code"], "rate_limit_exceeded");
            // A's client goes away mid-stream: its slot goes to B at the next step, long before
            // A's 40 tokens would have been written.
            let gone = Instant::now();
            drop(sock);
            let r = b.join().unwrap();
            assert!(gone.elapsed() < Duration::from_secs(20));
            r
        })
    };
    assert_eq!(b.0, 200, "{}", b.1);
    let h = srv.wait_health("A cancelled", |h| h["cancelled"] == 1 && h["active"] == 0);
    assert_eq!(h["queued"], 0, "{h}");
    assert!(srv.wait_log("(client went away)", 5), "{}", srv.log_text());
    assert!(srv.log_text().contains("\"POST /v1/chat/completions\" 429"));
    serves();
    // A client that leaves before a non-streamed answer frees its slot too.
    let mut sock = TcpStream::connect(srv.addr()).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\n\r\n{long_req}",
        long_req.len()
    )
    .unwrap();
    srv.wait_health("the non-streamed request decoding", |h| h["active"] == 1);
    drop(sock);
    srv.wait_health("the non-streamed request cancelled", |h| {
        h["cancelled"] == 2 && h["active"] == 0
    });
    assert!(
        srv.wait_log("\"POST /v1/chat/completions\" - 0 B", 5),
        "{}",
        srv.log_text()
    );
    serves();
    // A body declared far beyond the limit is refused before it is read.
    let mut sock = TcpStream::connect(srv.addr()).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{{\"model\": \"sft\", \"pad\": \"xxxx",
        64 << 20
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut resp = String::new();
    let _ = sock.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    assert_error(
        413,
        &parse(body),
        413,
        None,
        "larger than this server accepts",
    );
    serves();
    assert!(!srv.log_text().contains("panicked"), "{}", srv.log_text());
}

#[test]
fn reward_model_scores_equal_kiln_rm_score() {
    let m = models();
    let srv = Server::start(&m.rm(), &["--api-key", KEY]);
    let prompt = "What is 2 plus 3?";
    let responses = ["2 plus 3 is 5.", "I do not know.", "2 plus 3 is 7."];
    let (st, r) = srv.post(
        "/v1/score",
        &json!({"model": "rm", "prompt": prompt, "response": responses}).to_string(),
    );
    assert_eq!(st, 200, "{r}");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = responses
        .iter()
        .map(|resp| json!({"prompt": prompt, "response": resp}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = text(
        &common::ok(
            THREADS,
            &["rm", "score", "--model", s(&m.rm()), "--input", s(&input)],
        )
        .stdout,
    );
    let want: Vec<Value> = out.lines().map(parse).collect();
    assert_eq!(want.len(), 3);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(r["data"][i]["score"], w["score"], "{r} vs {w}");
        assert_eq!(r["data"][i]["normalized"], w["normalized"], "{r} vs {w}");
    }
    // A reward model does not chat.
    let (st, r) = srv.post(
        "/v1/chat/completions",
        &json!({"model": "rm", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    assert_error(st, &r, 400, None, "reward model");
    let (st, r) = srv.post(
        "/v1/score",
        &json!({"model": "rm", "prompt": prompt}).to_string(),
    );
    assert_error(st, &r, 400, Some("response"), "Missing required parameter");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < end,
            "kiln serve did not exit within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a raw stream to its end and returns its `data:` payloads.
fn finish_stream(mut sock: TcpStream) -> Vec<String> {
    let mut rest = String::new();
    sock.read_to_string(&mut rest).unwrap();
    // Chunked transfer encoding frames the events; the payloads are whole JSON lines.
    rest.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let m = models();
    let mut req = m.long_request.clone();
    req["stream"] = json!(true);

    // Graceful: the stream started before SIGTERM runs to its end; new connections are refused.
    let mut srv = Server::start(&m.sft(), &["--api-key", KEY, "--step-delay-ms", "25"]);
    let sock = start_stream(srv.addr(), &req.to_string());
    signal(&srv.child, libc::SIGTERM);
    assert!(
        srv.wait_log("SIGTERM: shutting down", 10),
        "{}",
        srv.log_text()
    );
    let events = finish_stream(sock);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let finish = parse(&events[events.len() - 2]);
    assert_eq!(
        finish["choices"][0]["finish_reason"], "length",
        "{events:?}"
    );
    let st = wait_exit(&mut srv.child, 20);
    assert!(st.success(), "{st:?}\n{}", srv.log_text());
    assert!(TcpStream::connect(srv.addr()).is_err());
    assert!(
        srv.log_text()
            .contains("kiln serve: stopped (1 sequences completed"),
        "{}",
        srv.log_text()
    );

    // Past the shutdown timeout, what is left ends with a clean error event.
    let mut srv = Server::start(
        &m.sft(),
        &[
            "--api-key",
            KEY,
            "--step-delay-ms",
            "100",
            "--shutdown-timeout",
            "0.2",
        ],
    );
    let sock = start_stream(srv.addr(), &req.to_string());
    signal(&srv.child, libc::SIGINT);
    let events = finish_stream(sock);
    let last = parse(events.last().expect("an event"));
    assert_eq!(last["error"]["code"], "server_shutting_down", "{events:?}");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    let st = wait_exit(&mut srv.child, 20);
    assert!(st.success(), "{st:?}\n{}", srv.log_text());
    assert!(
        srv.log_text().contains("interrupt: shutting down"),
        "{}",
        srv.log_text()
    );
}

#[test]
fn serve_refuses_what_it_cannot_do_with_clear_errors() {
    let m = models();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    common::fails(
        THREADS,
        &["serve", "--model", s(&m.sft()), "--port", &port],
        &["cannot listen on 127.0.0.1:"],
    );
    common::fails(
        THREADS,
        &["serve", "--model", s(&m.sft()), "--max-batch", "0"],
        &["--max-batch must be at least 1"],
    );
    let missing = m.root.join("no-such-model");
    common::fails(
        THREADS,
        &["serve", "--model", s(&missing)],
        &["no-such-model"],
    );
}

/// A model directory that transformers wrote (its own tokenizer and Llama 3 Jinja template, two
/// end-of-sequence ids): chat completions render with that template and answer what `kiln chat`
/// answers.
#[test]
fn a_hugging_face_model_serves_what_kiln_chat_answers() {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures/llama3_chat");
    let srv = Server::start(&model, &["--model-name", "sft"]);
    for seed in [1, 2] {
        let (st, r) = srv.post(
            "/v1/chat/completions",
            &chat_body("What is 2 plus 3?", seed, 1.0, 8, json!({})),
        );
        assert_eq!(st, 200, "{r}");
        let got = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, kiln_chat(&model, "What is 2 plus 3?", seed, 1.0, 8));
        assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{r}");
    }
    // A completion continues a document as `kiln generate` does: after the model's own
    // beginning-of-sequence token, ending at its own end-of-sequence tokens (Kiln's ids mean
    // other tokens in this vocabulary).
    for seed in [1, 2] {
        let gen = text(
            &common::ok(
                THREADS,
                &[
                    "generate",
                    "--model",
                    s(&model),
                    "--prompt",
                    "Mia",
                    "--seed",
                    &seed.to_string(),
                    "--temperature",
                    "1.0",
                    "--max-new-tokens",
                    "12",
                ],
            )
            .stdout,
        );
        let body = json!({"model": "sft", "prompt": "Mia", "seed": seed, "temperature": 1.0,
            "max_tokens": 12});
        let (st, c) = srv.post("/v1/completions", &body.to_string());
        assert_eq!(st, 200, "{c}");
        assert_eq!(
            format!("Mia{}\n", c["choices"][0]["text"].as_str().unwrap()),
            gen,
            "seed {seed}"
        );
    }
}
