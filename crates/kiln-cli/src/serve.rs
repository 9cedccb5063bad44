//! `kiln serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/v1/score` for reward models, `/health`) with continuous batching, and a chat
//! page at `/`.
//!
//! The model thread (the thread that calls [`run_serve`], a worker of Kiln's compute pool) owns the
//! model and the KV cache and runs [`engine::Engine`]; the HTTP side (tokio and axum on their own
//! threads) checks requests, renders prompts, and hands the engine jobs over a channel, getting
//! each sequence's text back over a channel of its own.

mod api;
mod engine;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use futures_util::StreamExt;
use kiln_data::chat_format::ChatFormat;
use kiln_data::datasets::Message;
use kiln_data::Tokenizer;
use kiln_model::{Arch, PackedWeights, Sampling, WeightFormat};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};

use api::{ApiError, CommonParams, Fields};
use engine::{Engine, Event, Finish, GenJob, GenParams, Job, ScoreJob, SeqSpec, Shared};

/// Largest request body accepted (413 beyond).
const MAX_BODY: usize = 4 << 20;

/// The chat page, served at `/`.
const PAGE: &str = include_str!("serve/page.html");

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (a checkpoint or a run directory): a chat model, or a reward model for
    /// /v1/score.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The model's id in the API (`model` in requests, GET /v1/models) [default: the --model
    /// directory's name].
    #[arg(long)]
    model_name: Option<String>,
    /// Weights of the matrix products: f32 (the model's own; with --max-batch above 1, decoding
    /// steps multiply by a copy of the block matrices in f32 panels, the same values and the same
    /// results, faster for batches), or an inference-only bf16 or int8 copy (faster, slightly
    /// different logits).
    #[arg(long, default_value_t = WeightFormat::F32)]
    weights: WeightFormat,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port. The bound address is printed to stderr as
    /// `listening on http://HOST:PORT`.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Sequences decoded together: the KV cache's slots, each as long as the model's context. The
    /// cache is allocated once at start (its size is printed); a sequence starts when a slot is
    /// free. A request with `n` > 1 takes n slots.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Default and upper limit of a request's `max_tokens`.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sequences that may wait for a free slot; a request beyond it gets 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on the /v1/ routes (default: $KILN_API_KEY if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Seconds that in-flight requests get to finish after SIGTERM or Ctrl-C before they are
    /// stopped with an error (a second signal stops them at once).
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Testing: sleep this many milliseconds after every decoding step.
    #[arg(long, default_value_t = 0, hide = true)]
    step_delay_ms: u64,
}

/// What the handlers need: the model's description, the tokenizer and template to render
/// prompts, the limits, and the way to the model thread.
struct AppState {
    model_name: String,
    stage: String,
    tokenizer: Arc<Tokenizer>,
    /// The model's chat format: Kiln's template, or a Hugging Face model's Jinja template.
    chat: Arc<dyn ChatFormat + Send + Sync>,
    chat_stops: Vec<u32>,
    n_ctx: usize,
    can_generate: bool,
    can_score: bool,
    reward_stats: Option<(f32, f32)>,
    slots: usize,
    cache_bytes: usize,
    max_tokens: usize,
    max_queue: usize,
    api_key: Option<String>,
    created: u64,
    jobs: std::sync::mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

type St = State<Arc<AppState>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(a.shutdown_timeout >= 0.0 && a.shutdown_timeout.is_finite()) {
        bail!("--shutdown-timeout must be a number of seconds >= 0");
    }
    let b = crate::cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    let cfg = b.model.cfg.clone();
    let can_score = cfg.score_head;
    let can_generate = cfg.arch == Arch::Decoder && !can_score;
    if !can_generate && !can_score {
        bail!(
            "{}: an encoder without a score head can neither chat nor score (kiln fill-mask uses it)",
            b.dir.display()
        );
    }
    let model_name = match &a.model_name {
        Some(n) => n.clone(),
        None => a
            .model
            .canonicalize()
            .unwrap_or_else(|_| a.model.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kiln".into()),
    };
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("KILN_API_KEY").ok().filter(|k| !k.is_empty()));
    let chat = b.chat_format()?;
    let chat_stops = chat.stop_tokens()?;
    let slots = if can_generate { a.max_batch } else { 0 };
    let cache_bytes = engine::cache_bytes(&b.model, slots);
    let packed = if can_generate {
        a.weights.packed().map(|f| PackedWeights::new(&b.model, f))
    } else {
        None
    };
    // With f32 weights, batched decoding steps multiply by f32 panels of the block matrices: the
    // same bits per row as alone, faster than the model's own layout from a few rows on.
    let panels = (can_generate && packed.is_none() && slots > 1)
        .then(|| PackedWeights::f32_blocks(&b.model));
    let what = if can_generate {
        "chat model"
    } else {
        "reward model"
    };
    eprintln!(
        "kiln serve: {} as {model_name:?} ({what}, {} stage, {:.2} M parameters, context {}, weights {})",
        b.dir.display(),
        if b.meta.stage.is_empty() { "unknown" } else { &b.meta.stage },
        cfg.num_params() as f64 / 1e6,
        cfg.n_ctx,
        if can_generate { a.weights } else { WeightFormat::F32 },
    );
    if can_generate {
        eprintln!(
            "kv cache: {slots} slots x {} positions = {:.2} MiB, allocated once (a sequence starts when a slot is free; up to {} wait)",
            cfg.n_ctx,
            cache_bytes as f64 / (1 << 20) as f64,
            a.max_queue
        );
    }
    if let Some(p) = &panels {
        eprintln!(
            "decoding on f32 panels of the block matrices: {:.2} MiB (--max-batch 1 decodes on the model's own weights)",
            p.bytes() as f64 / (1 << 20) as f64
        );
    }
    let tokenizer = Arc::new(b.tokenizer);
    let shared = Arc::new(Shared::default());
    let (jobs, jobs_rx) = std::sync::mpsc::channel();
    let state = Arc::new(AppState {
        model_name,
        stage: b.meta.stage.clone(),
        tokenizer: tokenizer.clone(),
        chat,
        chat_stops,
        n_ctx: cfg.n_ctx,
        can_generate,
        can_score,
        reward_stats: b.meta.reward_mean.zip(b.meta.reward_std),
        slots,
        cache_bytes,
        max_tokens: a.max_tokens,
        max_queue: a.max_queue,
        api_key,
        created: unix_now(),
        jobs,
        shared: shared.clone(),
    });
    let engine = Engine::new(
        b.model,
        (packed, panels),
        tokenizer,
        slots,
        shared.clone(),
        Duration::from_millis(a.step_delay_ms),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((a.host.as_str(), a.port)))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let addr = listener.local_addr()?;
    let auth_note = if state.api_key.is_some() {
        " (API key required)"
    } else {
        ""
    };
    eprintln!("listening on http://{addr}{auth_note}");
    let app = router(state);
    let stop_http = Arc::new(Notify::new());
    rt.spawn(signals(
        shared.clone(),
        stop_http.clone(),
        Duration::from_secs_f64(a.shutdown_timeout),
    ));
    let server_shared = shared.clone();
    rt.spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop_http.notified().await })
        .await;
        if let Err(e) = served {
            eprintln!("error: the HTTP server stopped: {e}");
        }
        server_shared.closed.store(true, Ordering::SeqCst);
    });
    engine.run(jobs_rx);
    rt.shutdown_timeout(Duration::from_secs(1));
    eprintln!(
        "kiln serve: stopped ({} sequences completed, {} cancelled)",
        shared.completed.load(Ordering::SeqCst),
        shared.cancelled.load(Ordering::SeqCst)
    );
    Ok(())
}

/// The first SIGTERM or Ctrl-C stops accepting connections and lets in-flight requests finish;
/// after the timeout, or at a second signal, what is left is stopped with an error.
async fn signals(shared: Arc<Shared>, stop_http: Arc<Notify>, timeout: Duration) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let which = next_signal(&mut term).await;
    shared.draining.store(true, Ordering::SeqCst);
    let busy = shared.active.load(Ordering::SeqCst) + shared.queued.load(Ordering::SeqCst);
    eprintln!(
        "{which}: shutting down; {busy} sequence(s) in flight get {:.0} s to finish (signal again to stop them now)",
        timeout.as_secs_f64()
    );
    stop_http.notify_one();
    tokio::select! {
        _ = tokio::time::sleep(timeout) => {}
        _ = next_signal(&mut term) => {}
    }
    let left = shared.active.load(Ordering::SeqCst) + shared.queued.load(Ordering::SeqCst);
    if left > 0 {
        eprintln!("stopping {left} unfinished sequence(s) with an error");
    }
    shared.abort.store(true, Ordering::SeqCst);
    // Connections that still hold on (a client that never reads) do not keep the process alive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shared.closed.store(true, Ordering::SeqCst);
}

async fn next_signal(term: &mut Option<tokio::signal::unix::Signal>) -> &'static str {
    let sigterm = async {
        match term {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupt",
        Some(()) = sigterm => "SIGTERM",
    }
}

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/score", post(score))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn(body_size));
    Router::new()
        .route("/", get(page))
        .route("/favicon.ico", get(no_icon))
        .route("/health", get(health))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn no_icon() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(
        format!("Unknown request URL: {method} {}. See GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/score, GET /health.", uri.path()),
        "unknown_url",
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::bad_request(format!(
        "Method {method} is not allowed for {}.",
        uri.path()
    ))
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

/// Refuses a body whose declared length is over the limit before reading it (a body without a
/// length is cut off at the limit as it is read: [`body_error`]).
async fn body_size(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large().into_response();
    }
    next.run(req).await
}

fn too_large() -> ApiError {
    ApiError::bad_request(format!(
        "The request body is larger than this server accepts ({MAX_BODY} bytes)."
    ))
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(k) if same_secret(k, key) => {}
            Some(_) => {
                return ApiError::unauthorized("Incorrect API key provided.").into_response()
            }
            None => return ApiError::unauthorized(
                "You didn't provide an API key: send it as the header 'Authorization: Bearer KEY'.",
            )
            .into_response(),
        }
    }
    next.run(req).await
}

/// What an access log line records; printed when the response body has been sent, or when the
/// client went away first (before the answer, or in the middle of a stream).
struct LogLine {
    peer: Option<SocketAddr>,
    method: Method,
    path: String,
    /// None while the handler has not answered (a client that leaves first).
    status: Option<StatusCode>,
    start: Instant,
    bytes: usize,
    complete: bool,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let peer = self
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        eprintln!(
            "{peer} \"{} {}\" {} {} B {:.1} ms{}",
            self.method,
            self.path,
            self.status
                .map_or_else(|| "-".to_string(), |s| s.as_u16().to_string()),
            self.bytes,
            self.start.elapsed().as_secs_f64() * 1e3,
            if self.complete {
                ""
            } else {
                " (client went away)"
            }
        );
    }
}

async fn access_log(req: Request, next: Next) -> Response {
    let mut line = LogLine {
        peer: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        status: None,
        start: Instant::now(),
        bytes: 0,
        complete: false,
    };
    let resp = next.run(req).await;
    line.status = Some(resp.status());
    if let Some(n) = resp.body().size_hint().exact() {
        line.bytes = n as usize;
        line.complete = true;
        return resp;
    }
    // A streamed body: count it as it goes and log at its end.
    let (parts, body) = resp.into_parts();
    let mut inner = body.into_data_stream();
    let stream = futures_util::stream::poll_fn(move |cx| {
        let line = &mut line;
        let r = inner.poll_next_unpin(cx);
        match &r {
            Poll::Ready(Some(Ok(chunk))) => line.bytes += chunk.len(),
            Poll::Ready(None) => line.complete = true,
            _ => {}
        }
        r
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::bad_request(format!("Cannot read the request body: {}", e.body_text()))
    }
}

async fn health(State(st): St) -> Response {
    let sh = &st.shared;
    let draining = sh.draining.load(Ordering::SeqCst);
    let body = json!({
        "status": if draining { "shutting down" } else { "ok" },
        "model": st.model_name,
        "slots": st.slots,
        "active": sh.active.load(Ordering::SeqCst),
        "queued": sh.queued.load(Ordering::SeqCst),
        "completed": sh.completed.load(Ordering::SeqCst),
        "cancelled": sh.cancelled.load(Ordering::SeqCst),
        "generated_tokens": sh.generated_tokens.load(Ordering::SeqCst),
        "kv_cache_bytes": st.cache_bytes,
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    api::json_response(status, &body)
}

fn model_card(st: &AppState) -> Value {
    json!({
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "kiln",
        "context_length": st.n_ctx,
        "stage": st.stage,
        "capabilities": if st.can_generate { json!(["chat.completions", "completions"]) } else { json!(["score"]) },
    })
}

async fn list_models(State(st): St) -> Response {
    api::json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [model_card(&st)]}),
    )
}

async fn get_model(State(st): St, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    st.check_model(&id)?;
    Ok(api::json_response(StatusCode::OK, &model_card(&st)))
}

impl AppState {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model != self.model_name {
            return Err(ApiError::not_found(
                format!(
                    "The model '{model}' does not exist: this server serves '{}'.",
                    self.model_name
                ),
                "model_not_found",
            )
            .with_param("model"));
        }
        Ok(())
    }

    fn check_running(&self) -> Result<(), ApiError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(
                "The server is shutting down and takes no new requests.",
            ));
        }
        Ok(())
    }

    fn check_generation(&self) -> Result<(), ApiError> {
        if !self.can_generate {
            return Err(ApiError::bad_request(format!(
                "'{}' is a reward model: it scores responses (POST /v1/score) and does not generate.",
                self.model_name
            )));
        }
        Ok(())
    }

    fn check_context(&self, tokens: usize, param: &str) -> Result<(), ApiError> {
        if tokens >= self.n_ctx {
            return Err(ApiError::invalid(
                param,
                format!(
                    "This model's maximum context length is {} tokens, and your prompt has {tokens} \
                     tokens, leaving no room for a response. Shorten the {param}.",
                    self.n_ctx
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(())
    }

    /// The engine's settings for a request, with the server's defaults and limits.
    fn gen_params(&self, c: &CommonParams, stop_tokens: Vec<u32>) -> Result<GenParams, ApiError> {
        let max_tokens = match c.max_tokens {
            None => self.max_tokens,
            Some(m) if m as usize > self.max_tokens => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "Invalid 'max_tokens': {m} is more than this server allows ({}; kiln serve --max-tokens).",
                        self.max_tokens
                    ),
                ))
            }
            Some(m) => m as usize,
        };
        if c.n > self.slots {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "Invalid 'n': {} is more than this server decodes at once ({}; kiln serve --max-batch).",
                    c.n, self.slots
                ),
            ));
        }
        Ok(GenParams {
            sampling: Sampling {
                temperature: c.temperature.unwrap_or(1.0),
                top_k: c.top_k.unwrap_or(0),
                top_p: c.top_p.unwrap_or(1.0),
            },
            max_tokens,
            stop_tokens,
            stop_strings: c.stop.clone(),
        })
    }

    /// Queues a request's sequences with the model thread (429 when the queue is full).
    fn submit(&self, seqs: Vec<SeqSpec>, params: GenParams) -> Result<Receiver, ApiError> {
        self.check_running()?;
        let n = seqs.len();
        if n > self.max_queue {
            return Err(ApiError::bad_request(format!(
                "The request asks for {n} sequences; this server queues at most {} (kiln serve --max-queue).",
                self.max_queue
            )));
        }
        let before = self.shared.queued.fetch_add(n, Ordering::SeqCst);
        if before + n > self.max_queue {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(ApiError::busy(format!(
                "The server is busy: {before} sequences are waiting for a slot (at most {}); retry later.",
                self.max_queue
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job::Generate(GenJob {
            seqs,
            params: Arc::new(params),
            events: tx,
        });
        if self.jobs.send(job).is_err() {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(ApiError::unavailable("The model thread has stopped."));
        }
        Ok(rx)
    }
}

impl ApiError {
    fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
}

type Receiver = mpsc::UnboundedReceiver<Event>;

/// Seeds of a request's choices: `seed`, `seed + 1`, ... (a random base when none is given).
fn seeds(c: &CommonParams) -> u64 {
    c.seed.unwrap_or_else(rand::random)
}

/// A finished choice.
struct Choice {
    text: String,
    finish: Finish,
    tokens: usize,
}

/// Waits for every sequence of a request.
async fn collect(mut rx: Receiver, n: usize) -> Result<Vec<Choice>, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut done: Vec<Option<(Finish, usize)>> = vec![None; n];
    let mut left = n;
    while left > 0 {
        match rx.recv().await {
            Some(Event::Text { index, text }) => texts[index].push_str(&text),
            Some(Event::Done {
                index,
                finish,
                tokens,
            }) => {
                done[index] = Some((finish, tokens));
                left -= 1;
            }
            Some(Event::Aborted(why)) => return Err(ApiError::unavailable(why)),
            None => return Err(ApiError::internal("The model thread stopped.")),
        }
    }
    Ok(texts
        .into_iter()
        .zip(done)
        .map(|(text, d)| {
            let (finish, tokens) = d.expect("every choice finished");
            Choice {
                text,
                finish,
                tokens,
            }
        })
        .collect())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// What a streamed response needs to write its chunks.
struct StreamMeta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    n: usize,
    include_usage: bool,
    prompt_tokens: usize,
    /// Text the first chunk of each choice starts with (`echo` of a completion).
    echo: Vec<String>,
}

impl StreamMeta {
    fn chunk(&self, choices: Value) -> SseEvent {
        let mut c = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    }

    fn delta(&self, index: usize, text: Option<&str>, finish: Option<Finish>) -> SseEvent {
        let finish = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": index,
                "delta": match text { Some(t) => json!({"content": t}), None => json!({}) },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Text => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        self.chunk(json!([choice]))
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]` (or an error event
/// when the server stops the request). Dropping the stream (the client went away) closes the
/// request's channel, which frees its slots at the model thread's next step.
fn sse_stream(meta: StreamMeta, rx: Receiver) -> Response {
    let mut first: Vec<SseEvent> = Vec::new();
    for i in 0..meta.n {
        match meta.kind {
            Kind::Chat => first.push(meta.chunk(json!([{
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]))),
            Kind::Text if !meta.echo[i].is_empty() => {
                first.push(meta.delta(i, Some(&meta.echo[i]), None))
            }
            Kind::Text => {}
        }
    }
    struct S {
        meta: StreamMeta,
        rx: Receiver,
        pending: std::collections::VecDeque<SseEvent>,
        left: usize,
        completion_tokens: usize,
        ended: bool,
    }
    let s = S {
        left: meta.n,
        meta,
        rx,
        pending: first.into(),
        completion_tokens: 0,
        ended: false,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), s));
            }
            if s.ended {
                return None;
            }
            if s.left == 0 {
                if s.meta.include_usage {
                    let mut c = json!({
                        "id": s.meta.id,
                        "object": if s.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": s.meta.created,
                        "model": s.meta.model,
                        "system_fingerprint": null,
                        "choices": [],
                    });
                    c["usage"] = usage(s.meta.prompt_tokens, s.completion_tokens);
                    s.pending.push_back(SseEvent::default().data(c.to_string()));
                }
                s.pending.push_back(SseEvent::default().data("[DONE]"));
                s.ended = true;
                continue;
            }
            match s.rx.recv().await {
                Some(Event::Text { index, text }) => {
                    let ev = s.meta.delta(index, Some(&text), None);
                    s.pending.push_back(ev);
                }
                Some(Event::Done {
                    index,
                    finish,
                    tokens,
                }) => {
                    s.completion_tokens += tokens;
                    s.left -= 1;
                    let ev = s.meta.delta(index, None, Some(finish));
                    s.pending.push_back(ev);
                }
                Some(Event::Aborted(why)) => {
                    s.pending.push_back(
                        SseEvent::default().data(ApiError::unavailable(why).body().to_string()),
                    );
                    s.ended = true;
                }
                None => {
                    s.pending.push_back(
                        SseEvent::default().data(
                            ApiError::internal("The model thread stopped.")
                                .body()
                                .to_string(),
                        ),
                    );
                    s.ended = true;
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// `POST /v1/chat/completions`: the messages rendered with the model's chat template; each of
/// the `n` choices is its own sequence with seed `seed + i`. For one user message and the same
/// seed, temperature, top-p/top-k and token limit, the text is what `kiln chat --prompt` prints.
async fn chat_completions(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let map = Fields::parse(&body)?;
    let f = Fields::new(&map);
    let c = api::common(&f)?;
    let messages: Vec<Message> = api::messages(&f)?;
    st.check_model(&c.model)?;
    st.check_generation()?;
    let prompt = st
        .chat
        .render_prompt(&messages)
        .map_err(|e| ApiError::internal(format!("rendering the chat template: {e}")))?;
    st.check_context(prompt.len(), "messages")?;
    let params = st.gen_params(&c, st.chat_stops.clone())?;
    let seed = seeds(&c);
    let prompt_tokens = prompt.len();
    let prompt = Arc::new(prompt);
    let seqs = (0..c.n)
        .map(|i| SeqSpec {
            index: i,
            prompt: prompt.clone(),
            seed: seed.wrapping_add(i as u64),
        })
        .collect();
    let rx = st.submit(seqs, params)?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    if c.stream {
        let meta = StreamMeta {
            kind: Kind::Chat,
            id,
            created,
            model: st.model_name.clone(),
            n: c.n,
            include_usage: c.include_usage,
            prompt_tokens,
            echo: vec![String::new(); c.n],
        };
        return Ok(sse_stream(meta, rx));
    }
    let choices = collect(rx, c.n).await?;
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": st.model_name,
        "system_fingerprint": null,
        "choices": choices.iter().enumerate().map(|(i, ch)| json!({
            "index": i,
            "message": {"role": "assistant", "content": ch.text},
            "logprobs": null,
            "finish_reason": ch.finish.as_str(),
        })).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion),
    });
    Ok(api::json_response(StatusCode::OK, &body))
}

/// `POST /v1/completions`: each prompt continued as a document (after `<|endoftext|>`, as `kiln
/// generate` does), `n` choices per prompt (choice `p * n + i` has seed `seed + i`).
async fn completions(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let map = Fields::parse(&body)?;
    let f = Fields::new(&map);
    let c = api::common(&f)?;
    let prompts = api::prompts(&f)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    f.unsupported("suffix", "no insertion")?;
    st.check_model(&c.model)?;
    st.check_generation()?;
    // A document, as `kiln generate` continues one: after the tokenizer's beginning-of-sequence
    // token (if it has one), ending at its end-of-sequence tokens (Kiln's: <|endoftext|>).
    let specials = st.tokenizer.specials();
    let params = st.gen_params(&c, specials.eos.clone())?;
    let seed = seeds(&c);
    let mut seqs = Vec::new();
    let mut prompt_tokens = 0;
    for (p, text) in prompts.iter().enumerate() {
        let tokens: Vec<u32> = specials
            .bos
            .into_iter()
            .chain(st.tokenizer.encode(text))
            .collect();
        let param = if prompts.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{p}]")
        };
        st.check_context(tokens.len(), &param)?;
        prompt_tokens += tokens.len();
        let tokens = Arc::new(tokens);
        for i in 0..c.n {
            seqs.push(SeqSpec {
                index: p * c.n + i,
                prompt: tokens.clone(),
                seed: seed.wrapping_add(i as u64),
            });
        }
    }
    let total = seqs.len();
    let echo_text: Vec<String> = (0..total)
        .map(|i| {
            if echo {
                prompts[i / c.n].clone()
            } else {
                String::new()
            }
        })
        .collect();
    let rx = st.submit(seqs, params)?;
    let id = new_id("cmpl");
    let created = unix_now();
    if c.stream {
        let meta = StreamMeta {
            kind: Kind::Text,
            id,
            created,
            model: st.model_name.clone(),
            n: total,
            include_usage: c.include_usage,
            prompt_tokens,
            echo: echo_text,
        };
        return Ok(sse_stream(meta, rx));
    }
    let choices = collect(rx, total).await?;
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    let body = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": st.model_name,
        "system_fingerprint": null,
        "choices": choices.iter().enumerate().map(|(i, ch)| json!({
            "index": i,
            "text": format!("{}{}", echo_text[i], ch.text),
            "logprobs": null,
            "finish_reason": ch.finish.as_str(),
        })).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion),
    });
    Ok(api::json_response(StatusCode::OK, &body))
}

/// `POST /v1/score` (reward models): `{"model", "prompt", "response": string or [strings]}` →
/// each response's score as `kiln rm score` computes it, and normalised by the reward model's
/// training statistics when it has them.
async fn score(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let map = Fields::parse(&body)?;
    let f = Fields::new(&map);
    let model = api::model_field(&f)?;
    let prompt = match f.string("prompt")? {
        Some(p) => p.to_string(),
        None => {
            return Err(ApiError::invalid(
                "prompt",
                "Missing required parameter: 'prompt'.",
            ))
        }
    };
    let responses = api::responses(&f)?;
    st.check_model(&model)?;
    if !st.can_score {
        return Err(ApiError::bad_request(format!(
            "'{}' is not a reward model (it has no score head); serve a `kiln rm` model to score.",
            st.model_name
        )));
    }
    st.check_running()?;
    let mut seqs = Vec::with_capacity(responses.len());
    for (i, r) in responses.iter().enumerate() {
        let rendered = st
            .chat
            .render_prompt_response(&[Message::user(prompt.clone())], r)
            .map_err(|e| ApiError::internal(format!("rendering the chat template: {e}")))?;
        let fit = kiln_data::template::fit_example(&rendered, st.n_ctx - 1).ok_or_else(|| {
            ApiError::invalid(
                if responses.len() == 1 {
                    "response".to_string()
                } else {
                    format!("response[{i}]")
                },
                format!(
                    "The response does not fit the model's context of {} tokens.",
                    st.n_ctx
                ),
            )
            .with_code("context_length_exceeded")
        })?;
        seqs.push(fit.tokens);
    }
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let (tx, rx) = oneshot::channel();
    st.jobs
        .send(Job::Score(ScoreJob { seqs, reply: tx }))
        .map_err(|_| ApiError::unavailable("The model thread has stopped."))?;
    let scores = rx
        .await
        .map_err(|_| ApiError::unavailable("The server is shutting down."))?;
    let data: Vec<Value> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            json!({
                "object": "score",
                "index": i,
                "score": s,
                "normalized": st.reward_stats.map(|(m, sd)| (s - m) / sd),
            })
        })
        .collect();
    Ok(api::json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "model": st.model_name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    ))
}
