//! Who gets in: bearer tokens with roles, TLS and mutual TLS, against the real
//! server on loopback.

use crate::common;

use std::{path::Path, time::Duration};

use common::*;
use tlserve::proto::{
    self, embedder_client::EmbedderClient, models_client::ModelsClient,
    trainer_client::TrainerClient,
};
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code, Request, Status,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const INFER_TOKEN: &str = "infer-secret-5b1f0c9e27d4a8";
const TRAIN_TOKEN: &str = "train-secret-93ce71a0b4f2d6";

type Authed =
    InterceptedService<Channel, Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>>;

/// Adds `authorization: Bearer <token>` to every call (none when `token` is None).
fn with_token(channel: Channel, token: Option<&str>) -> Authed {
    let value: Option<MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().expect("header value"));
    InterceptedService::new(
        channel,
        Box::new(move |mut request: Request<()>| {
            if let Some(value) = &value {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        }),
    )
}

fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!("# name roles token\nweb infer {INFER_TOKEN}\ntrainer infer,train {TRAIN_TOKEN}\n"),
    )
    .expect("write tokens");
    path
}

async fn embed_code(channel: &Channel, token: Option<&str>) -> Code {
    match EmbedderClient::new(with_token(channel.clone(), token))
        .embed(embed_request(&["A cat sits on the mat."]))
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn tokens_and_roles_guard_every_service() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = write_tokens(dir.path());
    let server = TestServer::start(&format!(
        "{}\n[auth]\nenabled = true\ntokens_file = \"{}\"\n",
        TestServer::minilm_config("", ""),
        tokens.display()
    ))
    .await;
    let channel = server.channel().await;

    // Health needs no token (probes), so the server came up as usual.
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));

    // Embed: infer role.
    assert_eq!(embed_code(&channel, None).await, Code::Unauthenticated);
    assert_eq!(
        embed_code(&channel, Some("not-a-token-0000000000")).await,
        Code::Unauthenticated
    );
    assert_eq!(embed_code(&channel, Some(INFER_TOKEN)).await, Code::Ok);
    assert_eq!(embed_code(&channel, Some(TRAIN_TOKEN)).await, Code::Ok);

    // Read-only Models calls: infer; DeleteHead: train.
    let mut models = ModelsClient::new(with_token(channel.clone(), Some(INFER_TOKEN)));
    models
        .list_backbones(proto::ListBackbonesRequest {})
        .await
        .expect("infer may list backbones");
    let delete = proto::DeleteHeadRequest {
        head: "missing".into(),
    };
    let denied = models
        .delete_head(delete.clone())
        .await
        .expect_err("infer may not delete");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("train"), "{}", denied.message());
    let mut trainer_models = ModelsClient::new(with_token(channel.clone(), Some(TRAIN_TOKEN)));
    let past_auth = trainer_models
        .delete_head(delete)
        .await
        .expect_err("no such head");
    assert_eq!(past_auth.code(), Code::NotFound, "{past_auth:?}");

    // Trainer: train role.
    let jobs = proto::ListJobsRequest::default();
    let denied = TrainerClient::new(with_token(channel.clone(), Some(INFER_TOKEN)))
        .list_jobs(jobs)
        .await
        .expect_err("infer may not see jobs");
    assert_eq!(denied.code(), Code::PermissionDenied);
    TrainerClient::new(with_token(channel.clone(), Some(TRAIN_TOKEN)))
        .list_jobs(jobs)
        .await
        .expect("train may list jobs");

    // Reflection stays open for grpcurl (no token).
    let output = std::process::Command::new(grpcurl())
        .args(["-plaintext", &server.grpc.to_string(), "list"])
        .output()
        .expect("run grpcurl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("tlserve.v1.Embedder"));

    // Refusals are counted under their codes; tokens never reach the logs.
    let scrape = server.scrape();
    assert!(
        metric(
            &scrape,
            r#"tlserve_grpc_requests_total{service="tlserve.v1.Embedder",method="Embed",code="UNAUTHENTICATED"}"#
        ) >= 2.0,
        "{scrape}"
    );
    let logs = server.logs();
    assert!(logs.contains("token accepted"), "{logs}");
    for secret in [INFER_TOKEN, TRAIN_TOKEN, "not-a-token-0000000000"] {
        assert!(!logs.contains(secret), "a token reached the logs");
    }
}

#[tokio::test]
async fn a_misconfigured_token_list_stops_the_server_with_a_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "web admin short\n").expect("write");
    let mut server = TestServer::spawn(
        &format!(
            "{}\n[auth]\nenabled = true\ntokens_file = \"{}\"\n",
            TestServer::minilm_config("", ""),
            tokens.display()
        ),
        &[],
    );
    let code = server.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0), "the server must not start");
    let logs = server.logs();
    assert!(logs.contains("unknown role `admin`"), "{logs}");
    assert!(!logs.contains("short"), "the secret was quoted: {logs}");
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client
/// certificate, all signed by the CA, as PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: String,
    client_key: String,
    ca_pem: String,
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (curl) takes a certificate whose issuer equals
    // its subject for self-signed, and rcgen gives every certificate the same.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tlserve test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("client key");
    let client = CertificateParams::new(vec!["client".to_owned()])
        .expect("client params")
        .signed_by(&client_key, &issuer)
        .expect("client cert");

    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
        ca_pem: ca.pem(),
    }
}

/// A TLS channel to the server that trusts the test CA, optionally with the
/// client certificate; None when the handshake fails.
async fn tls_channel(server: &TestServer, pki: &Pki, with_client_cert: bool) -> Option<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Channel::from_shared(format!("https://{}", server.grpc))
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .ok()
}

/// Health over TLS, once the server is up.
async fn wait_serving_over_tls(server: &TestServer, pki: &Pki, with_client_cert: bool) -> Channel {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(channel) = tls_channel(server, pki, with_client_cert).await {
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status());
            if status.ok() == Some(ServingStatus::Serving) {
                return channel;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "TLS server not serving:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The status curl reads for GET /v1/models at `url` with `options`; None
/// when no HTTP answer comes back (refused, handshake failed).
fn curl_status(url: &str, options: &[&std::ffi::OsStr]) -> Option<u16> {
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(options)
        .arg(format!("{url}/v1/models"))
        .output()
        .expect("run curl");
    let code: u16 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()?;
    (output.status.success() && code != 0).then_some(code)
}

/// The HTTP port over TLS, trusting the test CA, optionally with a client
/// certificate.
fn https_status(server: &TestServer, pki: &Pki, client: Option<(&Path, &Path)>) -> Option<u16> {
    let port = server.http.port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let mut options: Vec<&std::ffi::OsStr> = vec![
        "--cacert".as_ref(),
        pki.ca.as_os_str(),
        "--resolve".as_ref(),
        resolve.as_ref(),
    ];
    if let Some((cert, key)) = client {
        options.extend([
            "--cert".as_ref(),
            cert.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
        ]);
    }
    curl_status(&format!("https://localhost:{port}"), &options)
}

/// The HTTP port in plaintext.
fn plain_http_status(server: &TestServer) -> Option<u16> {
    curl_status(&format!("http://{}", server.http), &[])
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path());
    let config = TestServer::minilm_config("", "");
    let cert = pki.server_cert.display().to_string();
    let key = pki.server_key.display().to_string();
    let ca = pki.ca.display().to_string();

    // TLS: a client that trusts the CA gets through; plaintext does not.
    let server = TestServer::spawn(
        &config,
        &[
            ("TLSERVE__SERVER__TLS__CERT_FILE", cert.as_str()),
            ("TLSERVE__SERVER__TLS__KEY_FILE", key.as_str()),
        ],
    );
    let channel = wait_serving_over_tls(&server, &pki, false).await;
    assert_eq!(embed_code(&channel, None).await, Code::Ok);
    assert_eq!(
        health_at(&server.url(), "").await,
        None,
        "plaintext must not be answered"
    );
    // The HTTP port speaks TLS with the same certificate.
    assert_eq!(https_status(&server, &pki, None), Some(200));
    assert_eq!(
        plain_http_status(&server),
        None,
        "plaintext HTTP must not be answered"
    );
    drop(server);

    // Mutual TLS: without a client certificate the handshake fails. Probes
    // that cannot speak TLS use the plaintext Health port.
    let health_port = free_port();
    let health_addr = format!("127.0.0.1:{health_port}");
    let server = TestServer::spawn(
        &config,
        &[
            ("TLSERVE__SERVER__TLS__CERT_FILE", cert.as_str()),
            ("TLSERVE__SERVER__TLS__KEY_FILE", key.as_str()),
            ("TLSERVE__SERVER__TLS__CLIENT_CA_FILE", ca.as_str()),
            ("TLSERVE__SERVER__HEALTH_LISTEN", health_addr.as_str()),
        ],
    );
    let channel = wait_serving_over_tls(&server, &pki, true).await;
    assert_eq!(embed_code(&channel, None).await, Code::Ok);
    assert_eq!(
        health_at(&format!("http://{health_addr}"), "").await,
        Some(ServingStatus::Serving),
        "the plaintext Health port answers probes"
    );
    let client_cert = dir.path().join("client.pem");
    let client_key = dir.path().join("client.key");
    std::fs::write(&client_cert, &pki.client_cert).expect("write");
    std::fs::write(&client_key, &pki.client_key).expect("write");
    assert_eq!(
        https_status(&server, &pki, Some((&client_cert, &client_key))),
        Some(200)
    );
    assert_eq!(
        https_status(&server, &pki, None),
        None,
        "the HTTP port asks for a client certificate too"
    );
    let anonymous = tls_channel(&server, &pki, false).await;
    let refused = match anonymous {
        None => true,
        Some(channel) => embed_code(&channel, None).await != Code::Ok,
    };
    assert!(refused, "a client without a certificate got through");
}

const TEAM_A_TOKEN: &str = "team-a-secret-0c41d7e9a2";
const TEAM_B_TOKEN: &str = "team-b-secret-7f02b9c1e5";
const ADMIN_TOKEN: &str = "admin-secret-a8e3d51c09";

/// Trains `head` with `token` on a few sentences; the job's id and its final
/// state.
async fn train_as(
    channel: &Channel,
    token: &str,
    head: &str,
) -> Result<(String, proto::JobState), Status> {
    let examples = four_reviews();
    let mut stream = TrainerClient::new(with_token(channel.clone(), Some(token)))
        .train_head(proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: head.into(),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet { examples },
            )),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await? {
        last = Some(event);
    }
    let last = last.expect("events");
    Ok((last.job_id.clone(), last.state()))
}

/// Predicts one sentence with `head` and `token`.
async fn predict_as(
    channel: &Channel,
    token: &str,
    head: &str,
) -> Result<proto::PredictResponse, Status> {
    tlserve::proto::predictor_client::PredictorClient::new(with_token(channel.clone(), Some(token)))
        .predict(proto::PredictRequest {
            head: head.into(),
            inputs: vec![text_input("fine")],
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_token_acts_only_inside_its_namespaces() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "a infer,train {TEAM_A_TOKEN} team-a\nb infer,train {TEAM_B_TOKEN} team-b\n\
             admin infer,train {ADMIN_TOKEN}\n"
        ),
    )
    .expect("write tokens");
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&format!(
        "{}\n[auth]\nenabled = true\ntokens_file = \"{}\"\n[heads]\nstore_dir = \"{}\"\n",
        TestServer::minilm_config("", ""),
        tokens.display(),
        store.path().display()
    ))
    .await;
    let channel = server.channel().await;

    let (job, state) = train_as(&channel, TEAM_A_TOKEN, "team-a.reviews")
        .await
        .expect("a trains in its namespace");
    assert_eq!(state, proto::JobState::Succeeded);
    let outside = train_as(&channel, TEAM_A_TOKEN, "team-b.reviews")
        .await
        .expect_err("a may not train in b's namespace");
    assert_eq!(outside.code(), Code::PermissionDenied);

    // b can neither read, use, delete nor watch a's head and job...
    let mut b_models = ModelsClient::new(with_token(channel.clone(), Some(TEAM_B_TOKEN)));
    let head = || proto::GetHeadRequest {
        head: "team-a.reviews".into(),
    };
    let denied = b_models
        .get_head(head())
        .await
        .expect_err("b reads a's head");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = b_models
        .delete_head(proto::DeleteHeadRequest {
            head: "team-a.reviews".into(),
        })
        .await
        .expect_err("b deletes a's head");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = predict_as(&channel, TEAM_B_TOKEN, "team-a.reviews")
        .await
        .expect_err("b predicts with a's head");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut b_trainer = TrainerClient::new(with_token(channel.clone(), Some(TEAM_B_TOKEN)));
    let denied = b_trainer
        .watch_job(proto::WatchJobRequest {
            job_id: job.clone(),
        })
        .await
        .expect_err("b watches a's job");
    assert_eq!(denied.code(), Code::PermissionDenied);
    // ... nor sees them listed.
    let listed = b_models
        .list_heads(proto::ListHeadsRequest::default())
        .await
        .expect("ListHeads")
        .into_inner();
    assert!(listed.heads.is_empty(), "{listed:?}");
    let jobs = b_trainer
        .list_jobs(proto::ListJobsRequest {
            include_finished: true,
        })
        .await
        .expect("ListJobs")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{jobs:?}");

    // a and a token without namespaces see the head.
    for token in [TEAM_A_TOKEN, ADMIN_TOKEN] {
        ModelsClient::new(with_token(channel.clone(), Some(token)))
            .get_head(head())
            .await
            .expect("in scope");
    }
}

/// Uploads four sentences as a dataset with `token`.
async fn upload_as(channel: &Channel, token: &str) -> Result<proto::Dataset, Status> {
    let chunk = proto::UploadDatasetRequest {
        examples: four_reviews(),
    };
    TrainerClient::new(with_token(channel.clone(), Some(token)))
        .upload_dataset(tokio_stream::iter([chunk]))
        .await
        .map(tonic::Response::into_inner)
}

/// Queues a job of many epochs training `head` with `token`; its id.
async fn queue_long_job(channel: &Channel, token: &str, head: &str) -> Result<String, Status> {
    let rows = read_tsv("topics_train.tsv");
    let mut stream = TrainerClient::new(with_token(channel.clone(), Some(token)))
        .train_head(proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: head.into(),
            training: Some(proto::TrainingConfig {
                epochs: 10_000,
                learning_rate: 0.02,
                no_validation: true,
                ..Default::default()
            }),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet {
                    examples: examples(&rows),
                },
            )),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(stream.message().await?.expect("the QUEUED event").job_id)
}

/// Cancels a job with `token` and follows it to its end.
async fn cancel_as(channel: &Channel, token: &str, job_id: &str) {
    let mut trainer = TrainerClient::new(with_token(channel.clone(), Some(token)));
    trainer
        .cancel_job(proto::CancelJobRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("CancelJob");
    let mut events = trainer
        .watch_job(proto::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("WatchJob")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while events.message().await.expect("events").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "a cancelled job did not end");
}

/// RESOURCE_EXHAUSTED naming `setting`.
fn assert_quota(refused: Status, setting: &str) {
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(setting), "{refused:?}");
}

/// One namespace's token cannot take every namespace's slots: with the
/// default shares (half of each store-wide bound), team-a fills its share of
/// the datasets, of the job queue and of the head versions and is refused
/// beyond it, naming the quota, while team-b still uploads, queues and
/// trains.
#[tokio::test]
async fn one_namespace_cannot_fill_every_namespaces_slots() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("a infer,train {TEAM_A_TOKEN} team-a\nb infer,train {TEAM_B_TOKEN} team-b\n"),
    )
    .expect("write tokens");
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&format!(
        "{}\n[auth]\nenabled = true\ntokens_file = \"{}\"\n[heads]\nstore_dir = \"{}\"\n\
         max_datasets = 4\nmax_heads = 2\nmax_concurrent_jobs = 1\nmax_queued_jobs = 2\n",
        TestServer::minilm_config("", ""),
        tokens.display(),
        store.path().display()
    ))
    .await;
    let channel = server.channel().await;

    // Datasets: 2 of 4 each.
    for _ in 0..2 {
        upload_as(&channel, TEAM_A_TOKEN).await.expect("a's share");
    }
    let refused = upload_as(&channel, TEAM_A_TOKEN)
        .await
        .expect_err("past a's share");
    assert_quota(refused, "heads.max_datasets_per_namespace");
    upload_as(&channel, TEAM_B_TOKEN).await.expect("b uploads");

    // Jobs queued or running: 2 of 3 each.
    let mut jobs = Vec::new();
    for head in ["team-a.long-1", "team-a.long-2"] {
        let job = queue_long_job(&channel, TEAM_A_TOKEN, head).await;
        jobs.push((TEAM_A_TOKEN, job.expect("a's share")));
    }
    let refused = queue_long_job(&channel, TEAM_A_TOKEN, "team-a.long-3")
        .await
        .expect_err("past a's share");
    assert_quota(refused, "heads.max_queued_jobs_per_namespace");
    let job = queue_long_job(&channel, TEAM_B_TOKEN, "team-b.long").await;
    jobs.push((TEAM_B_TOKEN, job.expect("b queues")));
    for (token, job) in &jobs {
        cancel_as(&channel, token, job).await;
    }

    // Head versions: 1 of 2 each.
    let (_, state) = train_as(&channel, TEAM_A_TOKEN, "team-a.one")
        .await
        .expect("a's share");
    assert_eq!(state, proto::JobState::Succeeded);
    let refused = train_as(&channel, TEAM_A_TOKEN, "team-a.two")
        .await
        .expect_err("past a's share");
    assert_quota(refused, "heads.max_heads_per_namespace");
    let (_, state) = train_as(&channel, TEAM_B_TOKEN, "team-b.one")
        .await
        .expect("b trains");
    assert_eq!(state, proto::JobState::Succeeded);
    predict_as(&channel, TEAM_B_TOKEN, "team-b.one")
        .await
        .expect("the server still serves");
}
